"""Node settings: defaults < settings file < ``RECONCILER_*`` < command-line flags."""
