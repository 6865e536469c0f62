"""The node's GPUs (docs/contract.md §11): NVML discovery, the setting, participation, drift.

Discovery is driven through a fake NVML: an object with the ``pynvml`` functions the agent
calls and an ``NVMLError`` class, injected into ``runtime.gpus.discover_gpus``. One test uses
the real ``pynvml`` of this machine, which has no NVIDIA driver: that is what a node without
NVIDIA does. The converge tests run the real transaction on a real node (history, record,
receipts) with the fake edges of ``test_failure_policy`` and a host edge over the fake NVML
and a real folder of CDI spec files.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from reconciler.apply.edges import NodeHost
from reconciler.apply.transaction import converge_with
from reconciler.config.settings import Settings
from reconciler.core.cdi import HostFacts
from reconciler.core.documents import Snapshot
from reconciler.core.gpus import GpuDevice, discovered, gpu_fingerprint, no_gpus, with_setting
from reconciler.core.outcome import ApplyResult
from reconciler.core.participation import participation
from reconciler.core.schema import validate
from reconciler.report.host_view import gpu_metrics
from reconciler.report.metrics import render
from reconciler.report.node_report import report_payload
from reconciler.report.status import format_status, status_report
from reconciler.runtime import gpus as gpus_edge
from reconciler.runtime.gpus import discover_gpus
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import snapshot_payload
from tests.support.signing import RepositorySimulator
from tests.test_failure_policy import IMAGE_1, Scene, web

GIB = 1 << 30


class NVMLError(Exception):
    pass


@dataclass
class FakeMemory:
    total: int


@dataclass
class FakeNvml:
    """The part of ``pynvml`` the agent uses. ``fail`` names a function that raises
    ``NVMLError``; ``block`` makes ``nvmlInit`` wait for it (a wedged driver)."""

    gpus: list[tuple[str, str, int]] = field(default_factory=list)  # (uuid, name, bytes)
    driver: str | bytes = "550.54.14"
    fail: str | None = None
    block: threading.Event | None = None
    calls: list[str] = field(default_factory=list)
    NVMLError: type[Exception] = NVMLError

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail == name:
            raise NVMLError(f"{name} failed: Unknown Error")

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        self._call("nvmlInit")
        if self.block is not None:
            self.block.wait(30)

    def nvmlShutdown(self) -> None:  # noqa: N802
        self._call("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self) -> str | bytes:  # noqa: N802
        self._call("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._call("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        self._call("nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:  # noqa: N802
        self._call("nvmlDeviceGetUUID")
        return self.gpus[handle][0]

    def nvmlDeviceGetName(self, handle: int) -> bytes:  # noqa: N802
        self._call("nvmlDeviceGetName")
        return self.gpus[handle][1].encode()  # as older nvidia-ml-py versions return it

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> FakeMemory:  # noqa: N802
        self._call("nvmlDeviceGetMemoryInfo")
        return FakeMemory(total=self.gpus[handle][2])


TWO_GPUS = [("GPU-aaaa", "NVIDIA A10", 24 * GIB), ("GPU-bbbb", "NVIDIA L4", 22 * GIB + (512 << 20))]


# ---- discovery ------------------------------------------------------------------------------


def test_two_gpus_are_read_and_the_largest_single_gpu_is_the_vram_figure() -> None:
    nvml = FakeNvml(gpus=TWO_GPUS, driver=b"550.54.14")
    facts = discover_gpus(nvml)
    assert facts.source == "nvml"
    assert facts.devices == (
        GpuDevice(index=0, uuid="GPU-aaaa", name="NVIDIA A10", memory_mib=24576),
        GpuDevice(index=1, uuid="GPU-bbbb", name="NVIDIA L4", memory_mib=23040),
    )
    assert facts.vram_mib == 24576  # not the 47616 of both together
    assert facts.driver == "550.54.14"
    assert nvml.calls[0] == "nvmlInit" and nvml.calls[-1] == "nvmlShutdown"


@pytest.mark.parametrize("fail", ["nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetMemoryInfo"])
def test_an_nvml_error_is_no_gpus_with_its_line_and_never_an_exception(fail: str) -> None:
    nvml = FakeNvml(gpus=TWO_GPUS, fail=fail)
    facts = discover_gpus(nvml)
    assert facts.source == "none" and facts.devices == () and facts.vram_mib is None
    assert facts.note == f"NVML: NVMLError: {fail} failed: Unknown Error"
    if fail != "nvmlInit":  # initialised, so shut down again
        assert nvml.calls[-1] == "nvmlShutdown"


def test_no_gpu_is_source_none_and_keeps_the_driver() -> None:
    facts = discover_gpus(FakeNvml(gpus=[]))
    assert (facts.source, facts.note, facts.driver) == ("none", "NVML found no GPU", "550.54.14")


def test_a_missing_library_is_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    facts = discover_gpus()
    assert facts.source == "none"
    assert facts.note is not None and facts.note.startswith("NVML library not installed")


def test_this_machine_without_an_nvidia_driver_says_none_through_the_real_pynvml() -> None:
    pytest.importorskip("pynvml")
    facts = discover_gpus()
    assert facts.source == "none"
    assert facts.note is not None and "NVML" in facts.note


def test_a_hanging_driver_is_cut_at_the_timeout_and_not_called_again_while_it_hangs() -> None:
    wedged = threading.Event()
    nvml = FakeNvml(gpus=TWO_GPUS, block=wedged)
    started = time.monotonic()
    facts = discover_gpus(nvml, timeout_s=0.3)
    took = time.monotonic() - started
    assert facts.source == "none" and facts.note == "NVML did not answer within 0.3 s"
    assert 0.3 <= took < 5
    again = discover_gpus(nvml, timeout_s=0.3)
    assert again.note is not None and "still not answering" in again.note
    assert nvml.calls.count("nvmlInit") == 1  # no second thread stuck behind the first
    wedged.set()
    deadline = time.monotonic() + 10
    while discover_gpus(FakeNvml(gpus=TWO_GPUS)).source != "nvml":
        assert time.monotonic() < deadline, "discovery never recovered after the hang ended"
        time.sleep(0.05)


def test_discovery_logs_one_line_per_change_not_per_pass(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reconciler")
    gpus_edge._last_logged = None
    for _ in range(3):
        discover_gpus(FakeNvml(gpus=[]))
    discover_gpus(FakeNvml(gpus=TWO_GPUS))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gpus:")]
    assert lines == [
        "gpus: none (NVML found no GPU)",
        "gpus: nvml: 2 GPU(s), 24576 MiB (largest single GPU), driver 550.54.14",
    ]


# ---- the setting, the fingerprint, participation -------------------------------------------


def test_the_vram_setting_wins_and_keeps_the_devices() -> None:
    found = discover_gpus(FakeNvml(gpus=TWO_GPUS))
    assert with_setting(found, None) is found
    set_by_hand = with_setting(found, 16000)
    assert (set_by_hand.source, set_by_hand.vram_mib) == ("setting", 16000)
    assert set_by_hand.devices == found.devices
    assert with_setting(no_gpus("x"), 8000).source == "setting"


def test_the_fingerprint_follows_driver_devices_and_specs_but_not_the_setting() -> None:
    base = discovered([GpuDevice(0, "GPU-a", "A10", 24576)], driver="550.54.14")
    specs = [("/etc/cdi/nvidia.yaml", "1" * 64)]
    print_ = gpu_fingerprint(base, specs)
    assert gpu_fingerprint(with_setting(base, 8000), specs) == print_
    assert gpu_fingerprint(replace(base, note="other"), specs) == print_
    assert gpu_fingerprint(replace(base, driver="555.42.02"), specs) != print_
    other_gpu = replace(base, devices=(GpuDevice(0, "GPU-b", "A10", 24576),))
    assert gpu_fingerprint(other_gpu, specs) != print_
    assert gpu_fingerprint(base, [("/etc/cdi/nvidia.yaml", "2" * 64)]) != print_


def _gated_snapshot() -> Snapshot:
    payload = snapshot_payload(models=[("small", "v1"), ("big", "v1")])
    payload["models"][0]["min_vram_mib"] = 20000
    payload["models"][1]["min_vram_mib"] = 40000
    payload["participation"]["subclouds"] = [
        {"id": "eu-small", "enabled": True, "models": ["small:v1"]},
        {"id": "eu-big", "enabled": True, "models": ["big:v1"]},
        {"id": "eu-floor", "enabled": True, "min_vram_mib": 30000},
    ]
    validate("snapshot", payload)
    return Snapshot.from_payload(payload)


def test_participation_is_gated_on_the_discovered_vram() -> None:
    snapshot = _gated_snapshot()
    a10 = discover_gpus(FakeNvml(gpus=TWO_GPUS))
    view = participation(snapshot, vram_mib=a10.vram_mib, opt_out=())
    assert view.subclouds == ("eu-small",)
    assert view.for_vram == ("eu-big", "eu-floor")
    assert dict(view.excluded)["eu-floor"] == "needs 30000 MiB of VRAM, node has 24576"
    assert dict(view.excluded)["eu-big"] == "cannot serve big:v1 (VRAM: node has 24576 MiB)"
    none = participation(snapshot, vram_mib=discover_gpus(FakeNvml()).vram_mib, opt_out=())
    assert none.subclouds == ()
    h100 = discover_gpus(FakeNvml(gpus=[("GPU-h", "NVIDIA H100", 80 * GIB)]))
    assert participation(snapshot, vram_mib=h100.vram_mib, opt_out=()).subclouds == (
        "eu-small",
        "eu-big",
        "eu-floor",
    )


# ---- through the transaction ---------------------------------------------------------------


@dataclass
class FakeHost:
    """The production ``NodeHost`` over a fake NVML and a real folder of CDI spec files."""

    nvml: FakeNvml
    cdi_dir: Path

    def read(self, settings: Settings) -> HostFacts:
        folders = (str(self.cdi_dir),)
        return NodeHost(self.nvml).read(replace(settings, cdi_spec_dirs=folders))


SPEC = """cdiVersion: 0.5.0
kind: example.com/gpu
devices:
  - name: "0"
    containerEdits:
      deviceNodes: [{path: /dev/null}]
      env: [{env}]
"""


@pytest.fixture
def scene(make_node: Callable[..., NodeUnderTest], tmp_path: Path) -> Scene:
    network = RepositorySimulator(folder=tmp_path / "origin")
    agent = make_node((tmp_path / "origin").as_uri(), network.roots[1])
    return Scene(agent=agent, network=network)


def test_a_converge_uses_discovered_vram_holds_an_undefined_device_and_follows_drift(
    scene: Scene, tmp_path: Path
) -> None:
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    host = FakeHost(FakeNvml(gpus=TWO_GPUS), cdi)
    edges = replace(scene.edges(), host=host)
    gpu = web(IMAGE_1, devices=["example.com/gpu=0"])
    gpu["name"] = "gpu"
    subclouds = [
        {"id": "eu-24g", "enabled": True, "min_vram_mib": 24000},
        {"id": "eu-80g", "enabled": True, "min_vram_mib": 80000},
    ]
    scene.publish(
        runtimes=[web(IMAGE_1), gpu], participation={"modes": ["testnet"], "subclouds": subclouds}
    )

    first = converge_with(scene.node(), edges=edges, offline=False)
    assert first.result is ApplyResult.CONVERGED, first.message
    assert (
        "gpu: device example.com/gpu=0 is not defined by any CDI spec on this node" in first.message
    )
    assert sorted(scene.runtime.containers) == ["reconciler-web"]
    record = scene.record()
    assert record["quarantined"] == [] and record["last_error"] is None
    status = status_report(scene.node())
    assert status["converged"] is True
    assert status["held"] == [
        {
            "runtime": "gpu",
            "device": "example.com/gpu=0",
            "why": "device example.com/gpu=0 is not defined by any CDI spec on this node",
        }
    ]
    assert status["gpus"]["source"] == "nvml" and status["gpus"]["vram_mib"] == 24576
    assert status["participation"]["subclouds"] == ["eu-24g"]
    assert status["participation"]["excluded_for_vram"] == ["eu-80g"]
    text = format_status(status)
    assert "gpus        nvml: 2 GPU(s), 24576 MiB (largest single GPU), driver 550.54.14" in text
    assert (
        "held        runtime gpu: device example.com/gpu=0 is not defined by any CDI spec on "
        "this node" in text
    )
    assert "excluded    subcloud eu-80g: needs 80000 MiB of VRAM, node has 24576" in text
    payload = report_payload(scene.node())
    assert payload["gpus"]["vram_mib"] == 24576
    assert payload["excluded_for_vram"] == ["eu-80g"]
    assert payload["held"] == [{"runtime": "gpu", "device": "example.com/gpu=0"}]
    metrics = render(gpu_metrics(scene.node()))
    assert "reconciler_runtimes_held 1" in metrics
    assert "reconciler_subclouds_excluded_vram 1" in metrics

    # The spec appears: the held runtime is created; web is untouched.
    (cdi / "gpu.yaml").write_text(SPEC.replace("{env}", "A=1"))
    web_id = scene.runtime.containers["reconciler-web"].id
    second = converge_with(scene.node(), edges=edges, offline=False)
    assert second.result is ApplyResult.CONVERGED, second.message
    assert sorted(scene.runtime.containers) == ["reconciler-gpu", "reconciler-web"]
    gpu_id = scene.runtime.containers["reconciler-gpu"].id
    assert status_report(scene.node())["held"] == []

    # A regenerated spec, then a driver update: each replaces the gpu container only.
    for change in (
        lambda: (cdi / "gpu.yaml").write_text(SPEC.replace("{env}", "A=2")),
        lambda: setattr(host.nvml, "driver", "555.42.02"),
    ):
        change()
        again = converge_with(scene.node(), edges=edges, offline=False)
        assert again.result is ApplyResult.CONVERGED, again.message
        assert scene.runtime.containers["reconciler-gpu"].id != gpu_id
        assert scene.runtime.containers["reconciler-web"].id == web_id
        gpu_id = scene.runtime.containers["reconciler-gpu"].id

    # Nothing changed: a no-op pass. Nor does NVML failing once change anything: the devices
    # last seen are kept (status says so), so no container is replaced, no subcloud left.
    assert converge_with(scene.node(), edges=edges, offline=False).result is ApplyResult.NOOP
    host.nvml.fail = "nvmlInit"
    assert converge_with(scene.node(), edges=edges, offline=False).result is ApplyResult.NOOP
    assert scene.runtime.containers["reconciler-gpu"].id == gpu_id
    kept = status_report(scene.node())
    assert kept["gpus"]["source"] == "nvml" and kept["gpus"]["vram_mib"] == 24576
    assert (
        kept["gpus"]["note"] == "as last seen; now NVML: NVMLError: nvmlInit failed: Unknown Error"
    )
    assert kept["participation"]["subclouds"] == ["eu-24g"]
