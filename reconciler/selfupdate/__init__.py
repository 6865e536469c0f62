"""Agent releases (docs/contract.md §10): the agent installs, starts and judges new versions
of itself.

Where it sits: beside ``intake``, above the model store (whose verified download path it
uses) and below ``apply`` (whose last step installs an approved release) and the CLI (whose
``watch`` starts the selected release). ``folder`` keeps ``<state>/agent/`` and its record,
``install`` downloads, verifies and installs a release side by side, ``gate`` decides at
each start what runs and marks a release good after its first converged cycle. The rules
(trial, good, failed, three starts) are ``core.agentrelease``'s. Nothing here touches Podman,
git or the node record.
"""
