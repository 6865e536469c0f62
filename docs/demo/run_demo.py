#!/usr/bin/env python3
"""A node operator's first hour, on one machine, with no network: ``bash .ci/demo``.

Plays both sides of the network with the real ``reconcile`` command:

* the network: makes a throwaway key pair and root, builds a runtime image from
  busybox-static (``podman import``), pushes it to a ``docker-registry`` on 127.0.0.1, writes a
  multi-file model and serves the origin folder through nginx on 127.0.0.1
  (docs/demo/nginx.conf.in), and publishes signed snapshots with ``reconcile publish``;
* the node: a private Podman service (its own socket, containers.conf, storage.conf and
  registries.conf from docs/demo/podman_env/), ``reconcile init`` in the demo's folder,
  ``reconcile once`` twice (a first snapshot, then a second one with a new model version, new
  job parameters and a new image), ``status``, the audit trail with stock git, ``plan``, and
  ``rollback`` to the first snapshot.

Everything lives in one folder (``/tmp/reconciler-demo-XXXX``, printed first); the machine's
own settings (``/etc/reconciler``), containers and images are never read or touched. Every
process the demo starts is stopped when it ends, also on Ctrl-C or SIGTERM; the folder is
kept for a look around (``--clean`` removes it).

This is documentation that runs: it is not part of the ``reconciler`` package.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PODMAN_ENV = HERE / "podman_env"
NGINX_TEMPLATE = HERE / "nginx.conf.in"
ZERO_DIGEST = "sha256:" + "0" * 64
MIB = 1 << 20
COMMAND_TIMEOUT_S = 300  # no single step of the demo may take longer than this
MODEL_RATE = "1m"  # nginx limit_rate per model file: slow enough to watch the progress bar

# The runtime image's entry point: a stand-in for an inference server that says what it sees
# (its models, its job parameters) and re-reads jobs.json on SIGHUP (`notify: signal:HUP`).
RUNTIME_SCRIPT = """\
#!/bin/sh
version=$(cat /etc/runtime-version)
jobs=/run/reconciler/jobs.json
say() { echo "llm-runtime $version: $*"; }
trap 'say "SIGTERM: stopping"; exit 0' TERM
trap 'say "SIGHUP: jobs.json is now $(cat $jobs)"' HUP
say "serving $(cd /models && ls -d */* | tr '\\n' ' ')"
say "jobs.json $(cat $jobs)"
httpd -p 8080 -h /www
while :; do sleep 0.5; done
"""
APPLETS = ("sh", "cat", "echo", "sleep", "httpd", "wget", "ls", "test", "tr", "true", "kill")


# ---- output ----------------------------------------------------------------------------------


class Out:
    """Headed steps, commands as ``$ …`` lines, comments as ``# …`` lines (bold/dim on a TTY)."""

    def __init__(self, *, folder: Path, total_steps: int) -> None:
        self.folder = folder
        self.total = total_steps
        self.number = 0
        self.tty = sys.stdout.isatty()

    def style(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.tty else text

    def step(self, title: str, *why: str) -> None:
        self.number += 1
        head = f"━━ {self.number}/{self.total}  {title} "
        print("\n" + self.style("1;36", head + "━" * max(4, 78 - len(head))), flush=True)
        for paragraph in why:
            for line in textwrap.wrap(paragraph, 76):
                print(self.style("2", f"# {line}"), flush=True)

    def note(self, text: str) -> None:
        for line in textwrap.wrap(text, 76):
            print(self.style("2", f"# {line}"), flush=True)

    def short(self, text: str) -> str:
        return text.replace(str(self.folder), "$DEMO")

    def command(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
        # `reconcile` is on PATH after .ci/setup: show the command as an operator types it.
        shown = [Path(args[0]).name if Path(args[0]).name == "reconcile" else args[0], *args[1:]]
        print(self.style("1", "$ " + self.short(prefix + shlex.join(shown))), flush=True)

    def output(self, text: str, *, max_lines: int | None = None, width: int | None = None) -> None:
        lines = self.short(text).rstrip("\n").splitlines()
        if max_lines is not None and len(lines) > max_lines:
            lines = [*lines[:max_lines], f"… ({len(lines) - max_lines} more lines)"]
        for line in lines:
            if width is not None and len(line) > width:
                line = line[: width - 1] + "…"
            print(line, flush=True)


class DemoError(Exception):
    """A step of the demo did not do what it should; the message says which."""


# ---- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render(template: Path, target: Path, **values: str) -> Path:
    text = template.read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    target.write_text(text, encoding="utf-8")
    return target


@dataclass
class Services:
    """The processes the demo started, stopped in reverse order by ``stop_all``."""

    folder: Path
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    before_stop: list[Callable[[], None]] = field(default_factory=list)

    def start(
        self, name: str, args: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            # Own session: Ctrl-C in the terminal reaches the demo only, which then stops
            # these in order (containers before the Podman service, and so on).
            process = subprocess.Popen(
                list(args),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        self.started.append((name, process))
        return process

    def wait_until(
        self, ready: Callable[[], bool], *, what: str, process: subprocess.Popen[bytes], log: Path
    ) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            if ready():
                return
            time.sleep(0.05)
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        raise DemoError(f"{what} did not come up:\n{tail}")

    def stop_all(self) -> list[str]:
        stopped: list[str] = []
        for hook in reversed(self.before_stop):
            with contextlib.suppress(Exception):
                hook()
        for name, process in reversed(self.started):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=15)
            stopped.append(f"{name} (pid {process.pid})")
        stopped.extend(self._kill_leftovers())
        return stopped

    def _kill_leftovers(self) -> list[str]:
        """conmon outlives the Podman service (it watches containers, and lingers 300 s after
        each exec, i.e. each health probe): end the ones whose command line names our folder."""
        marker = (str(self.folder) + "/").encode()
        killed: list[str] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in {os.getpid(), os.getppid()}:
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            program = cmdline.split(b"\0", 1)[0].decode(errors="replace")
            # Only conmon: an operator's `tail -f $DEMO/…` in another terminal is left alone.
            if marker in cmdline and Path(program).name == "conmon":
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(f"{program} (pid {entry.name})")
        return killed


# ---- the demo ----------------------------------------------------------------------------------


@dataclass
class Demo:
    folder: Path
    out: Out
    services: Services
    reconcile_bin: str
    network_dir: Path = field(init=False)
    origin_dir: Path = field(init=False)
    node_dir: Path = field(init=False)
    podman_dir: Path = field(init=False)
    registry_host: str = ""
    origin_url: str = ""
    podman_url: str = ""
    podman_env: dict[str, str] = field(default_factory=dict)
    node_env: dict[str, str] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)  # version → pinned reference
    published: list[str] = field(default_factory=list)  # config digests, oldest first

    def __post_init__(self) -> None:
        self.network_dir = self.folder / "network"
        self.origin_dir = self.folder / "origin"
        self.node_dir = self.folder / "node"
        self.podman_dir = self.folder / "podman"
        for folder in (self.network_dir, self.origin_dir, self.node_dir, self.podman_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # -- running commands --

    def run(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        show_env: Mapping[str, str] | None = None,
        show: bool = True,
        live: bool = False,
        ok_codes: Sequence[int] = (0,),
        max_lines: int | None = None,
        width: int | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command; ``live`` lets it write to the terminal itself (progress bars)."""
        if show:
            self.out.command(args, show_env)
        full_env = {**_inherited_env(), **(env or {}), **(show_env or {})}
        try:
            if live:
                done = subprocess.run(
                    list(args), env=full_env, cwd=cwd, timeout=COMMAND_TIMEOUT_S, check=False
                )
                result = subprocess.CompletedProcess(done.args, done.returncode, "", "")
            else:
                result = subprocess.run(
                    list(args),
                    env=full_env,
                    cwd=cwd,
                    capture_output=True,
                    text=True,
                    timeout=COMMAND_TIMEOUT_S,
                    check=False,
                )
        except subprocess.TimeoutExpired as exc:
            raise DemoError(f"{shlex.join(args)} took more than {COMMAND_TIMEOUT_S} s") from exc
        if show and not live:
            self.out.output(result.stdout + result.stderr, max_lines=max_lines, width=width)
        if result.returncode not in ok_codes:
            detail = "" if show else self.out.short(result.stdout + result.stderr)
            raise DemoError(
                f"{self.out.short(shlex.join(args))} exited {result.returncode}\n{detail}"
            )
        return result

    def reconcile(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("env", self.node_env)
        return self.run([self.reconcile_bin, *args], **kwargs)

    def podman(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("env", self.podman_env)
        return self.run(["podman", "--url", self.podman_url, *args], **kwargs)

    # -- steps --

    def keys(self) -> None:
        self.out.step(
            "The network's keys and root of trust",
            "Two signing keys and a root that needs both (threshold 2 of 2): every document a"
            " node accepts must carry a threshold of signatures from its newest trusted root."
            " Production keys live offline, with separate key holders (`reconcile sign`).",
        )
        net = self.network_dir
        self.reconcile("keygen", str(net / "key-a"), env={})
        self.reconcile("keygen", str(net / "key-b"), env={})
        self.reconcile(
            "root",
            *("--version", "1", "--network", "testnet", "--threshold", "2"),
            *("--public", str(net / "key-a.pub"), "--public", str(net / "key-b.pub")),
            *("--key", str(net / "key-a.key"), "--key", str(net / "key-b.key")),
            *("--out", str(self.origin_dir / "root" / "1.json")),
            env={},
        )

    def infrastructure(self) -> None:
        self.out.step(
            "Local infrastructure: image registry, origin web server, Podman",
            "All on 127.0.0.1 and inside $DEMO: a docker-registry for the runtime image, nginx"
            " serving the origin folder with the cache headers of docs/publishing.md, and a"
            " private Podman API service with its own socket, containers.conf (runc, cgroupfs,"
            " ulimits) and storage, so this machine's own containers are never touched.",
        )
        # registry
        reg_dir = self.folder / "registry"
        reg_dir.mkdir()
        self.registry_host = f"127.0.0.1:{free_port()}"
        config = render(
            PODMAN_ENV / "registry.yml",
            reg_dir / "config.yml",
            TMP=str(reg_dir),
            REGISTRY=self.registry_host,
        )
        self._start_service(
            "docker-registry",
            ["docker-registry", "serve", str(config)],
            log=reg_dir / "registry.log",
            ready=lambda: _http_ok(f"http://{self.registry_host}/v2/"),
        )
        print(f"docker-registry  http://{self.registry_host}/", flush=True)
        # origin
        www = self.folder / "nginx"
        www.mkdir()
        port = free_port()
        self.origin_url = f"http://127.0.0.1:{port}/"
        conf = render(
            NGINX_TEMPLATE,
            www / "nginx.conf",
            PREFIX=str(www),
            PORT=str(port),
            ROOT=str(self.origin_dir),
            USER=pwd.getpwuid(os.getuid()).pw_name,
            RATE=MODEL_RATE,
        )
        self._start_service(
            "nginx",
            ["nginx", "-p", str(www), "-c", str(conf), "-e", str(www / "error.log")],
            log=www / "nginx.out",
            ready=lambda: _port_open(port),
        )
        print(f"nginx (origin)   {self.origin_url}  serving $DEMO/origin", flush=True)
        # Podman
        pod = self.podman_dir
        for sub in ("libpod-tmp", "image-copy", "networks"):
            (pod / sub).mkdir()
        self.podman_env = {
            "CONTAINERS_CONF": str(
                render(PODMAN_ENV / "containers.conf", pod / "containers.conf", TMP=str(pod))
            ),
            "CONTAINERS_STORAGE_CONF": str(
                render(PODMAN_ENV / "storage.conf", pod / "storage.conf", TMP=str(pod))
            ),
            "CONTAINERS_REGISTRIES_CONF": str(
                render(
                    PODMAN_ENV / "registries.conf",
                    pod / "registries.conf",
                    REGISTRY=self.registry_host,
                )
            ),
        }
        sock = pod / "podman.sock"
        self.podman_url = f"unix://{sock}"
        env = _inherited_env() | self.podman_env
        self._start_service(
            "podman system service",
            ["podman", "system", "service", "--time=0", self.podman_url],
            log=pod / "service.log",
            env=env,
            ready=lambda: _socket_answers(sock),
        )

        def remove_containers() -> None:
            self.podman("rm", "--all", "--force", "--time", "0", show=False, ok_codes=(0, 125))
            self.podman("network", "prune", "--force", show=False, ok_codes=(0, 125))

        self.services.before_stop.append(remove_containers)
        print(f"podman service   {self.out.short(self.podman_url)}", flush=True)

    def _start_service(
        self,
        name: str,
        args: Sequence[str],
        *,
        log: Path,
        ready: Callable[[], bool],
        env: Mapping[str, str] | None = None,
    ) -> None:
        process = self.services.start(name, args, log=log, env=env)
        self.services.wait_until(ready, what=name, process=process, log=log)

    def runtime_images(self) -> None:
        self.out.step(
            "The runtime image, built from busybox-static and pinned by digest",
            "A stand-in for an inference server: it prints the models it sees and its job"
            " parameters, and re-reads jobs.json on SIGHUP. Two versions are pushed to the"
            " registry; snapshots name them by digest, never by tag. Local copies are deleted"
            " so that the node really pulls.",
        )
        for version in ("1.0", "1.1"):
            tar = self._rootfs_tar(version)
            local = f"localhost/demo/llm-runtime:{version}"
            remote = f"{self.registry_host}/demo/llm-runtime:{version}"
            cmd = json.dumps(["/bin/runtime"])
            self.podman("import", "--change", f"CMD {cmd}", str(tar), local, max_lines=1)
            self.podman("push", "--quiet", "--tls-verify=false", local, remote)
            digest = _manifest_digest(self.registry_host, "demo/llm-runtime", version)
            self.images[version] = f"{self.registry_host}/demo/llm-runtime@{digest}"
            self.podman("rmi", "--force", local, show=False)
            print(f"pinned: {self.images[version]}", flush=True)

    def _rootfs_tar(self, version: str) -> Path:
        busybox = shutil.which("busybox") or "/bin/busybox"
        root = self.folder / "images" / version / "rootfs"
        for sub in ("bin", "www", "tmp", "etc", "models", "run/reconciler"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        for applet in APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
        (root / "bin" / "runtime").write_text(RUNTIME_SCRIPT, encoding="utf-8")
        (root / "bin" / "runtime").chmod(0o755)
        (root / "etc" / "runtime-version").write_text(version + "\n", encoding="utf-8")
        (root / "www" / "index.html").write_text(f"llm-runtime {version}\n", encoding="utf-8")
        tar = root.parent / "rootfs.tar"
        with tarfile.open(tar, "w") as archive:
            archive.add(root, arcname=".")
        return tar

    def write_model(self, version: str) -> dict[str, Any]:
        """A model of five files; v2 shares the tokenizer and two of three weight shards."""
        seed = {"v1": 1, "v2": 2}[version]
        files: dict[str, bytes] = {
            "config.json": json.dumps(
                {"architecture": "demo", "layers": 8 * seed, "version": version}, indent=2
            ).encode(),
            "tokenizer.json": random.Random(0).randbytes(384 * 1024),
        }
        for shard in (1, 2, 3):
            # Shards 1 and 2 are the same bytes in both versions; shard 3 changes.
            shard_seed = 100 + shard if shard < 3 else 200 + seed
            data = random.Random(shard_seed).randbytes(2 * MIB)
            files[f"weights/model-{shard:05d}-of-00003.safetensors"] = data
        entries = []
        for path, data in files.items():
            target = self.origin_dir / "models" / "demo-llm" / version / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            entries.append(
                {
                    "path": path,
                    "size": len(data),
                    "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                    "urls": [f"models/demo-llm/{version}/{path}"],
                }
            )
        return {"name": "demo-llm", "version": version, "files": entries, "tasks": ["chat"]}

    def snapshot(
        self, *, model: dict[str, Any], image_version: str, jobs: dict[str, int]
    ) -> dict[str, Any]:
        from reconciler import __version__

        model_id = f"{model['name']}:{model['version']}"
        image = self.images[image_version]
        return {
            "network": "testnet",
            "models": [model],
            "runtimes": [
                {
                    "name": "llm",
                    "image": image,
                    "models": [model_id],
                    "env": {"MODEL": f"{model['name']}/{model['version']}"},
                    "health": {
                        "command": ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/"],
                        "interval_s": 1,
                        "retries": 10,
                    },
                    "notify": "signal:HUP",
                }
            ],
            "jobs": jobs,
            "participation": {
                "modes": ["testnet"],
                "subclouds": [{"id": "demo", "enabled": True, "models": [model_id]}],
            },
            "ttl": {
                "poll_s": 60,
                "heartbeat_s": 30,
                "retry_min_s": 5,
                "retry_max_s": 300,
                "cache_s": 86400,
            },
            "updates": {
                "agent": {"version": __version__, "digest": ZERO_DIGEST},
                "runtime": {"version": image_version, "digest": image.rsplit("@", 1)[1]},
            },
        }

    def publish(self, number: int, document: dict[str, Any]) -> None:
        path = self.network_dir / f"snapshot-{number}.json"
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        net = self.network_dir
        result = self.reconcile(
            "publish",
            *("--origin", str(self.origin_dir)),
            *("--key", str(net / "key-a.key"), "--key", str(net / "key-b.key")),
            str(path),
            env={},
        )
        self.published.append(result.stdout.split()[-1])

    def publish_first(self) -> None:
        self.out.step(
            "Publish snapshot 1: runtime 1.0, model demo-llm:v1, job parameters",
            "The origin is a folder of static files. `reconcile publish` checks the snapshot"
            " against the schema every node applies, signs it (DSSE, Ed25519), writes the"
            " immutable snapshots/<hex>.json and then head.json, the only mutable file.",
        )
        model = self.write_model("v1")
        size = sum(f["size"] for f in model["files"])
        print(
            f"wrote demo-llm:v1 under $DEMO/origin/models: {len(model['files'])} files, "
            f"{size / MIB:.1f} MiB",
            flush=True,
        )
        document = self.snapshot(
            model=model,
            image_version="1.0",
            jobs={"max_tokens": 2048, "max_queue": 8, "timeout_s": 60},
        )
        self.publish(1, document)
        self.run(
            [
                "find",
                str(self.origin_dir),
                "-name",
                "models",
                "-prune",
                "-o",
                "-type",
                "f",
                "-print",
            ]
        )

    def init_node(self) -> None:
        self.out.step(
            "Set up the node: `reconcile init`",
            "The operator installs the network's root (obtained out of band) and points the"
            " node at the origin. Settings go to one TOML file; the environment below keeps"
            " this demo away from /etc/reconciler and the machine's Podman.",
        )
        config = self.node_dir / "config.toml"
        hooks = self.node_dir / "hooks"
        hooks.mkdir()
        for name in ("pre-apply", "post-apply"):
            shutil.copy2(REPO / "hooks" / name, hooks / name)
        self.node_env = {
            "RECONCILER_CONFIG": str(config),
            "CONTAINER_HOST": self.podman_url,
            # The sample pre-apply hook's reserve (its default, 2 GiB, is for real nodes).
            "RESERVE_BYTES": str(64 * MIB),
        }
        print(
            self.out.short(
                "\n".join(f"export {k}={shlex.quote(v)}" for k, v in self.node_env.items())
            ),
            flush=True,
        )
        self.out.note("the sample hooks from hooks/ are installed in $DEMO/node/hooks")
        self.reconcile(
            *("--state-dir", str(self.node_dir / "state"), "--hooks-dir", str(hooks)),
            *("init", "--origin", self.origin_url, "--root", str(self.origin_dir / "root/1.json")),
            show_env={
                "RECONCILER_METRICS_PATH": str(self.node_dir / "metrics.prom"),
                "RECONCILER_DISK_RESERVE_BYTES": str(64 * MIB),
            },
        )
        self.run(["cat", str(config)])

    def first_converge(self) -> None:
        self.out.step(
            "Converge: `reconcile once`",
            "Fetch and verify head.json and the snapshot, commit it to the node's git"
            " history, download and verify the model files, pull the image by digest, write"
            " runtime/jobs.json, start the container and gate it on its health check. One"
            " log line per action.",
        )
        self.reconcile("once", live=True)
        self.out.note("what Podman runs now, and what the runtime sees:")
        self.podman(
            "ps",
            "--format",
            "{{.Names}}  {{.Status}}  {{.Image}}",
        )
        self.podman("logs", "reconciler-llm")
        self.out.note("a second poll with nothing new costs one 304 (see nginx's access log):")
        self.reconcile("fetch")
        self.run(["grep", "head.json", str(self.folder / "nginx" / "access.log")])

    def publish_second(self) -> None:
        self.out.step(
            "Publish snapshot 2: runtime 1.1, model demo-llm:v2, new job parameters",
            "demo-llm:v2 shares its tokenizer and two of three weight shards with v1. The"
            " node stores blobs by content, so it downloads only the two files that changed.",
        )
        model = self.write_model("v2")
        document = self.snapshot(
            model=model,
            image_version="1.1",
            jobs={"max_tokens": 4096, "max_queue": 16, "timeout_s": 90},
        )
        self.publish(2, document)
        self.out.note("before applying, an operator can ask what the node would do:")
        self.reconcile("fetch")
        self.reconcile("plan")

    def second_converge(self) -> None:
        self.out.step(
            "Converge again: `reconcile once`",
            "The container is replaced (new image, new model mount); the old model tree is"
            " removed, its blobs are kept for rollback (keep_applied = 2).",
        )
        self.reconcile("once", live=True)
        self.podman("logs", "reconciler-llm")

    def inspect(self) -> None:
        self.out.step(
            "Look at the node: status, metrics, the audit trail with stock git, plan",
            "`status` answers from what the node recorded, without asking Podman or the"
            " origin. The audit trail is a plain git repository: one commit per accepted"
            " snapshot, one signed receipt per apply attempt in the notes.",
        )
        self.reconcile("status")
        self.run(["grep", "-v", "^#", str(self.node_dir / "metrics.prom")])
        repo = self.node_dir / "state" / "snapshots"
        self.run(["git", "-C", str(repo), "log", "--notes=applied"], width=110)
        self.out.note(
            "the newest receipt, decoded and abbreviated (a DSSE envelope signed with node.key):"
        )
        self._show_receipt(repo)
        self.reconcile("plan")

    def _show_receipt(self, repo: Path) -> None:
        note = self.run(
            ["git", "-C", str(repo), "notes", "--ref=applied", "show", "HEAD"], show=False
        ).stdout.splitlines()[-1]
        payload = json.loads(base64.b64decode(json.loads(note)["payload"]))
        lines = [
            f"result     {payload['result']} (serial {payload['serial']}, {payload['reason']})"
        ]
        lines += [f"step       {s['step']}: {s['detail']}" for s in payload["steps"]]
        lines += [
            f"action     {a['action']['kind']} {a['action']['container']}: {a['message']}"
            for a in payload["actions"]
        ]
        lines += [
            f"hook       {h['name']} exit {h['exit_code']}: {h['output'].strip()}"
            for h in payload["hooks"]
            if h["ran"]
        ]
        lines += [f"container  {c['name']} {c['state']}" for c in payload["containers"]]
        lines += [f"model      {m} {d}" for m, d in payload["models"].items()]
        self.out.output("\n".join(lines), width=110)

    def rollback(self) -> None:
        self.out.step(
            "Roll back to snapshot 1: `reconcile rollback`",
            "A new commit (Reason: rollback) makes snapshot 1 HEAD again, re-verified against"
            " the root that accepted it; the node converges to it and holds there until"
            " `reconcile resume`.",
        )
        self.reconcile("rollback", live=True)
        self.reconcile("status")
        self.reconcile("log")
        self.podman("logs", "reconciler-llm")

    def check(self) -> None:
        """The demo's own assertions: it fails loudly rather than print a happy story."""
        status = json.loads(self.reconcile("status", "--json", show=False).stdout)
        if not status["converged"] or status["applied"]["digest"] != self.published[0]:
            raise DemoError(f"not converged on snapshot 1 after rollback: {status}")
        if not status["hold"]["active"]:
            raise DemoError("rollback did not put the node on hold")
        metrics = (self.node_dir / "metrics.prom").read_text(encoding="utf-8")
        if "\nreconciler_model_bytes_installed 0\n" in metrics:
            raise DemoError("the metrics file says no model bytes are installed")
        verify = self.reconcile("verify", show=False)
        print(f"reconcile verify: {verify.stdout.strip().splitlines()[-1]}", flush=True)


def _inherited_env() -> dict[str, str]:
    """The demo's own environment without settings that would steer its node elsewhere
    (a RECONCILER_STATE_DIR or CONTAINER_HOST exported in the operator's shell)."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RECONCILER_", "RECONCILE_")) and key != "CONTAINER_HOST"
    }


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _socket_answers(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _manifest_digest(host: str, repository: str, tag: str) -> str:
    accept = "application/vnd.oci.image.manifest.v1+json, " + (
        "application/vnd.docker.distribution.manifest.v2+json"
    )
    request = urllib.request.Request(
        f"http://{host}/v2/{repository}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": accept},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        digest = response.headers["Docker-Content-Digest"]
    if not digest or not str(digest).startswith("sha256:"):
        raise DemoError(f"the registry gave no digest for {repository}:{tag}")
    return str(digest)


def _require_tools() -> str:
    missing = [
        tool
        for tool in ("podman", "runc", "docker-registry", "nginx", "git", "busybox")
        if shutil.which(tool) is None and not (tool == "busybox" and Path("/bin/busybox").exists())
    ]
    reconcile_bin = shutil.which("reconcile")
    if reconcile_bin is None:
        missing.append("reconcile (pip install -e .)")
    if missing:
        raise DemoError(f"missing: {', '.join(missing)} (bash .ci/setup installs them)")
    assert reconcile_bin is not None
    return reconcile_bin


@contextlib.contextmanager
def _signals_end_the_demo() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo like Ctrl-C does: through the cleanup."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clean", action="store_true", help="remove the demo's folder at the end")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        reconcile_bin = _require_tools()
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    # Short: the Podman socket's path must fit in 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="reconciler-demo-", dir="/tmp"))
    # nginx's worker must be able to read the origin folder.
    folder.chmod(0o755)
    steps = [
        "keys",
        "infrastructure",
        "runtime_images",
        "publish_first",
        "init_node",
        "first_converge",
        "publish_second",
        "second_converge",
        "inspect",
        "rollback",
    ]
    out = Out(folder=folder, total_steps=len(steps))
    services = Services(folder=folder)
    demo = Demo(folder=folder, out=out, services=services, reconcile_bin=reconcile_bin)
    print(out.style("1", "reconciler demo: a node operator's first hour"), flush=True)
    print(f"DEMO={folder}   (everything the demo makes lives here)", flush=True)
    code = 0
    with _signals_end_the_demo():
        try:
            for name in steps:
                getattr(demo, name)()
            demo.check()
        except DemoError as exc:
            print(f"\ndemo FAILED at step {out.number}: {exc}", file=sys.stderr, flush=True)
            code = 1
        except KeyboardInterrupt as exc:
            print(f"\ndemo interrupted ({exc or 'Ctrl-C'})", file=sys.stderr, flush=True)
            code = 130
        finally:
            print("\n" + out.style("1;36", "━━ cleaning up " + "━" * 63), flush=True)
            for line in services.stop_all():
                print(f"stopped {out.short(line)}", flush=True)
    minutes, seconds = divmod(int(time.monotonic() - started), 60)
    if args.clean:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"removed {folder}", flush=True)
    else:
        print(
            textwrap.dedent(
                f"""
                The node's state is kept in {folder}/node/state:
                  snapshots/  the audit trail (git -C {folder}/node/state/snapshots log)
                  models/     content-addressed blobs and installed trees
                  runtime/    jobs.json, participation.json … as the runtime reads them
                Look around with:  RECONCILER_CONFIG={folder}/node/config.toml reconcile log
                (containers and services are stopped; `rm -rf {folder}` when done)"""
            ),
            flush=True,
        )
    result = "done" if code == 0 else "FAILED"
    print(f"demo {result} in {minutes} min {seconds:02d} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
