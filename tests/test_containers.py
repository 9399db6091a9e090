"""Engines in containers (`[service.container]`), with Debian's podman and an image built here
from files (llama-server and the libraries `ldd` lists; no registry is reachable): the same
start, health, gate, router, stop, swap and restart guarantees as a process, and never a
container left behind. docker has no daemon on these machines: its flags are checked on the
command line that is built."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    SIM_UUID,
    Daemon,
    Podman,
    base_config,
    free_port,
    llama_server_pid,
    make_tiny_model,
    post,
    require_llama_server,
    running,
    wait_until,
)
from supervisord_llm import containers as C
from supervisord_llm.config import parse_config
from supervisord_llm.plan import ServicePlan
from supervisord_llm.sensors.base import GpuInfo

pytestmark = pytest.mark.e2e

PODMAN = shutil.which("podman")
IMAGE = "localhost/llama-tiny:test"


def _need_podman() -> str:
    if PODMAN is None:
        if os.environ.get("LLM_SUPERVISOR_REQUIRE_E2E") == "1":
            raise RuntimeError("podman is required (LLM_SUPERVISOR_REQUIRE_E2E=1): "
                               "apt-get install podman runc (scripts/setup.sh does)")
        pytest.skip("podman is not installed", allow_module_level=True)
    return PODMAN


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    pm = Podman(tmp_path_factory.mktemp("podman"), _need_podman())
    try:
        pm.build_image(require_llama_server(), IMAGE)
        yield pm
    finally:
        pm.clean()


@pytest.fixture(scope="module")
def cdi() -> Iterator[None]:
    """A CDI spec (as the NVIDIA container toolkit writes one) for simulated GPU 0: podman
    resolves `--device nvidia.com/gpu=UUID` through it, as on a real box. Its edits: a
    variable and a device node (/dev/null as /dev/nvidia-sim0)."""
    where = Path("/var/run/cdi")
    made = not where.exists()
    where.mkdir(parents=True, exist_ok=True)
    spec = where / f"llm-supervisor-test-{os.getpid()}.json"
    spec.write_text(json.dumps({
        "cdiVersion": "0.5.0", "kind": "nvidia.com/gpu", "containerEdits": {},
        "devices": [{"name": SIM_UUID.format(0), "containerEdits": {
            "env": ["SIM_GPU=0"],
            "deviceNodes": [{"path": "/dev/nvidia-sim0", "hostPath": "/dev/null"}]}}]}))
    try:
        yield
    finally:
        spec.unlink()
        if made:
            with contextlib.suppress(OSError):
                where.rmdir()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


def boxed(pm: Podman, model: Path, name: str = "boxed", **extra: Any) -> dict[str, Any]:
    """llama-server in a container, on the host's network."""
    container = {"image": IMAGE, "runtime_args": pm.args,
                 "run_args": ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                              "-v", f"{model}:/model.gguf:ro"],
                 **extra.pop("container", {})}
    svc: dict[str, Any] = {
        "name": name,
        "command": ["/bin/llama-server", "-m", "/model.gguf", "--host", "127.0.0.1",
                    "--port", "{port}", "-c", "512", "-t", "1", "--no-webui"],
        "port": free_port(),
        "container": container,
        "health": {"interval_s": 0.5, "timeout_s": 0.5, "failures": 3, "startup_timeout_s": 60},
        "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "max_restarts": 10,
                    "window_s": 60},
        "stop": {"timeout_s": 5},
    }
    svc.update(extra)
    return svc


def _ours(d: Daemon) -> str:
    return f"{C.LABEL_STATE}={d.doc['supervisor']['state_dir']}"


def _chat(port: int) -> dict[str, Any]:
    raw = post(port, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 4})
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:500]
    doc: dict[str, Any] = json.loads(body)
    return doc


def _cli_pid(d: Daemon, name: str) -> int:
    pid: int = d.service(name)["pid"]
    assert pid and "podman" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    return pid


# --- the command line ---------------------------------------------------------------------------


def _plan(doc: str, gpus: list[GpuInfo], cpus: tuple[int, ...] | None = None,
          node: int | None = None) -> ServicePlan:
    from supervisord_llm.plan import _pinning_env

    svc = parse_config(doc).services[0]
    env = (*svc.env, *_pinning_env(tuple(gpus), True))
    return ServicePlan(svc, tuple(gpus), node, cpus, node is not None, env, ())


def _gpu(i: int, vendor: str = "nvidia", devices: tuple[str, ...] = ()) -> GpuInfo:
    return GpuInfo(i, SIM_UUID.format(i), "x", f"00000000:{0x41 + i:02x}:00.0", vendor, 0,
                   None, None, None, None, None, None, devices=devices)


def test_the_run_line_carries_the_pinning() -> None:
    doc = """
[[service]]
name = "vllm"
port = 8000
command = ["--model", "Qwen/Qwen2.5-7B", "--port", "{port}"]
env = { HF_TOKEN = "secret" }
[service.container]
image = "docker.io/vllm/vllm-openai:v0.11.0"
run_args = ["--ipc=host", "-v", "/srv/hf:/root/.cache/huggingface"]
"""
    run = _plan(doc, [_gpu(0), _gpu(1)], (0, 1, 2, 3), 0).container_run()
    assert run is not None
    argv = run.argv("vllm", "vllm-1a2b3c4d", "/var/lib/llm-supervisor")
    assert argv[:5] == ("podman", "run", "--rm", "--name", "llm-vllm-1a2b3c4d")
    text = " ".join(argv)
    assert f"--device nvidia.com/gpu={SIM_UUID.format(0)} " \
           f"--device nvidia.com/gpu={SIM_UUID.format(1)}" in text
    assert "--cpuset-cpus 0-3 --cpuset-mems 0" in text
    assert "-e HF_TOKEN -e CUDA_VISIBLE_DEVICES -e CUDA_DEVICE_ORDER" in text
    assert "secret" not in text  # by name: the value stays in the CLI's environment
    assert f"--label {C.LABEL_KEEPER}=vllm-1a2b3c4d" in text
    assert f"--label {C.LABEL_STATE}=/var/lib/llm-supervisor" in text
    assert "--network host --stop-signal SIGTERM --stop-timeout 30" in text
    assert text.endswith("--ipc=host -v /srv/hf:/root/.cache/huggingface "
                         "docker.io/vllm/vllm-openai:v0.11.0 --model Qwen/Qwen2.5-7B "
                         "--port 8000")
    # docker's own flag: one device plain, several quoted as one CSV field
    docker = doc.replace('[service.container]', '[service.container]\nruntime = "docker"')
    run = _plan(docker, [_gpu(0)]).container_run()
    assert run is not None and run.options[run.options.index("--gpus") + 1] \
        == f"device={SIM_UUID.format(0)}"
    run = _plan(docker, [_gpu(0), _gpu(1)]).container_run()
    assert run is not None and run.options[run.options.index("--gpus") + 1] \
        == f'"device={SIM_UUID.format(0)},{SIM_UUID.format(1)}"'
    cdi = docker.replace('runtime = "docker"', 'runtime = "docker"\ngpu_flag = "cdi"')
    run = _plan(cdi, [_gpu(0)]).container_run()
    assert run is not None and "--gpus" not in run.options \
        and f"nvidia.com/gpu={SIM_UUID.format(0)}" in run.options


def test_an_amd_card_goes_in_as_kfd_and_its_render_node() -> None:
    doc = """
[[service]]
name = "rocm"
command = ["serve"]
[service.container]
image = "docker.io/rocm/vllm:latest"
"""
    gpu = GpuInfo(0, "GPU-2f987739463f9020", "RX", "0000:0f:00.0", "amd", -1, None, None,
                  None, None, None, None, devices=("/dev/dri/renderD128",))
    run = _plan(doc, [gpu]).container_run()
    assert run is not None
    assert " ".join(run.options).startswith(
        "--pull never --network host --stop-signal SIGTERM --stop-timeout 30 "
        "--device /dev/kfd --device /dev/dri/renderD128 -e ROCR_VISIBLE_DEVICES")
    # a card pinned by its host index is, in the container, the first of its cards
    indexed = GpuInfo(0, "AMD-0000:0f:00.0", "RX", "0000:0f:00.0", "amd", -1, None, None,
                      None, None, None, None, pin="3", devices=("/dev/dri/renderD129",))
    from supervisord_llm.plan import _pinning_env
    assert dict(_pinning_env((indexed,), True))["ROCR_VISIBLE_DEVICES"] == "0"
    assert dict(_pinning_env((indexed,), False))["ROCR_VISIBLE_DEVICES"] == "3"


def test_check_prints_the_exact_run_line(tmp_path: Path) -> None:
    doc = base_config(tmp_path, [{
        "name": "vllm", "port": 8123, "gpus": [1], "numa": "none",
        "command": ["--model", "m", "--port", "{port}"],
        "env": {"HF_TOKEN": "hush"},
        "container": {"image": "docker.io/vllm/vllm-openai:v0.11.0",
                      "runtime_args": ["--storage-driver", "vfs"], "pull": "missing"}}])
    cfg = tmp_path / "config.toml"
    from helpers import toml_dumps
    cfg.write_text(toml_dumps(doc))
    r = subprocess.run([sys.executable, "-m", "supervisord_llm", "--config", str(cfg),
                        "--check"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    state = doc["supervisor"]["state_dir"]
    assert "    image    docker.io/vllm/vllm-openai:v0.11.0 (pull missing)" in r.stdout
    assert (f"    run      podman --storage-driver vfs run --rm --name llm-vllm-XXXXXXXX "
            f"--label {C.LABEL_SERVICE}=vllm --label {C.LABEL_KEEPER}=vllm-XXXXXXXX "
            f"--label {C.LABEL_STATE}={state} --pull never --network host "
            f"--stop-signal SIGTERM --stop-timeout 30 --device "
            f"nvidia.com/gpu={SIM_UUID.format(1)} -e HF_TOKEN -e CUDA_VISIBLE_DEVICES "
            f"-e CUDA_DEVICE_ORDER docker.io/vllm/vllm-openai:v0.11.0 --model m --port 8123"
            ) in r.stdout, r.stdout
    assert "hush" not in r.stdout


def test_bad_container_sections_are_named(tmp_path: Path) -> None:
    from supervisord_llm.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config("""
[[service]]
name = "a"
user = "root"
[service.container]
image = "-x"
runtime = "crun"
run_args = ["--name=mine", "-d", "--restart", "always", "--network=bridge"]
pull = "always"
""")
    text = str(err.value)
    for part in ("service[0].container.image: must be an image reference",
                 'service[0].container.runtime: must be "podman", "docker" or an absolute',
                 "service[0].container.run_args[0]: --name is not for run_args",
                 "service[0].container.run_args[1]: -d is not for run_args",
                 "service[0].container.run_args[2]: --restart is not for run_args",
                 "service[0].container.run_args[4]: --network is not for run_args: use "
                 "`network`",
                 "service[0].container.pull: must be one of never, missing",
                 "service[0].user: not with [service.container]"):
        assert part in text, text
    # without a container, a command is still required
    with pytest.raises(ConfigError, match=r"service\[0\].command: required key is missing"):
        parse_config('[[service]]\nname = "a"\n')


# --- with podman ------------------------------------------------------------------------------


def test_a_container_serves_stops_swaps_and_restarts(tmp_path: Path, podman: Podman,
                                                     model: Path, cdi: None) -> None:
    router = free_port()
    svc = boxed(podman, model, numa=0, models=["tiny"], gpus=[0],
                gate={"listen": f"127.0.0.1:{free_port()}", "swap_port": free_port()},
                container={"pull": "missing"})
    doc = base_config(tmp_path, [svc], router={"listen": f"127.0.0.1:{router}"})
    with running(tmp_path, doc) as d:
        s = d.wait_state("boxed", "ready", 60)
        names = podman.names(_ours(d))
        assert len(names) == 1 and names[0].startswith("llm-boxed-")
        # the pinning, read back from the runtime
        info = podman.inspect(names[0])
        cpus = Path("/sys/devices/system/node/node0/cpulist").read_text().strip()
        assert info["HostConfig"]["CpusetCpus"] == cpus
        assert info["HostConfig"]["CpusetMems"] == "0"
        labels = info["Config"]["Labels"]
        assert labels[C.LABEL_SERVICE] == "boxed"
        assert names[0] == "llm-" + labels[C.LABEL_KEEPER]
        assert info["HostConfig"]["NetworkMode"] == "host"
        # the GPU, by UUID through CDI (the spec's edits are there), and pinned inside too
        env = dict(e.split("=", 1) for e in info["Config"]["Env"])
        assert env["SIM_GPU"] == "0" and env["CUDA_VISIBLE_DEVICES"] == SIM_UUID.format(0)
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert [d["PathInContainer"] for d in info["HostConfig"]["Devices"]] \
            == ["/dev/nvidia-sim0"]
        assert not any(k.startswith("LLM_SUPERVISOR") for k in env)
        # through the gate and the router
        gate_port = int(svc["gate"]["listen"].rsplit(":", 1)[1])
        assert _chat(gate_port)["object"] == "chat.completion"
        assert _chat(router)["object"] == "chat.completion"
        # the engine in the container crashes: restarted
        cli = s["pid"]
        os.kill(llama_server_pid(svc["port"]), signal.SIGKILL)
        wait_until(lambda: d.service("boxed")["pid"] not in (cli, None)
                   and d.service("boxed")["state"] == "ready", 60, what="restarted")
        assert d.service("boxed")["restarts"] >= 1
        assert len(podman.names(_ours(d))) == 1
        # the CLI is killed: its container (which outlives it) is removed, and a new one runs
        cli = _cli_pid(d, "boxed")
        old = podman.names(_ours(d))
        os.kill(cli, signal.SIGKILL)
        wait_until(lambda: d.service("boxed")["pid"] not in (cli, None)
                   and d.service("boxed")["state"] == "ready", 60, what="restarted after kill")
        assert len(podman.names(_ours(d))) == 1
        assert _chat(gate_port)["object"] == "chat.completion"
        # a hot swap: the new container on the swap port, the old one gone
        r = d.llmctl("swap", "boxed", timeout=120)
        assert r.returncode == 0, r.stderr + d.logtext()[-3000:]
        assert d.service("boxed")["port"] == svc["gate"]["swap_port"]
        wait_until(lambda: len(podman.names(_ours(d))) == 1, 30, what="the old one removed")
        assert podman.names(_ours(d)) != old
        assert _chat(gate_port)["object"] == "chat.completion"
        # stopped: no container at all
        r = d.llmctl("stop", "boxed", timeout=60)
        assert r.returncode == 0, r.stderr
        assert podman.names(_ours(d)) == []
        r = d.llmctl("start", "boxed", timeout=60)
        d.wait_state("boxed", "ready", 60)
        assert len(podman.names(_ours(d))) == 1
    # the daemon stopped: nothing left
    assert podman.names(_ours(d)) == []
    log = d.logtext()
    assert "Traceback" not in log


def test_a_refusal_fails_the_start_with_the_runtime_s_words(tmp_path: Path, podman: Podman,
                                                            model: Path) -> None:
    nope = boxed(podman, model, "nope", container={"image": "localhost/absent:1"})
    unpulled = boxed(podman, model, "unpulled",
                     container={"image": "localhost/absent:2", "pull": "missing"})
    missing = boxed(podman, model, "noruntime", container={"runtime": "/nonexistent/podman"})
    badflag = boxed(podman, model, "badflag", container={"run_args": ["--no-such-flag"]})
    nogpu = boxed(podman, model, "nogpu", gpus=[1])  # no CDI device for it on this host
    with running(tmp_path, base_config(tmp_path, [nope, unpulled, missing, badflag,
                                                  nogpu])) as d:
        for name, words in (("nope", "image not known"),
                            ("unpulled", "podman could not pull the image: localhost/absent:2 "
                                         "failed (exit 125); Error: "),
                            ("noruntime", "container runtime not found"),
                            ("badflag", "unknown flag"),
                            ("nogpu", f"unresolvable CDI devices nvidia.com/gpu="
                                      f"{SIM_UUID.format(1)}")):
            s = d.wait_state(name, "failed", 60)
            assert words in (s["failed_reason"] or ""), s
            assert s["restarts"] == 0, s  # not a crash loop
        r = d.llmctl("status")
        assert "image not known" in r.stdout, r.stdout
        assert podman.names(_ours(d)) == []
        assert "Traceback" not in d.logtext()


def test_the_daemon_killed_for_good_leaves_no_container(tmp_path: Path, podman: Podman,
                                                        model: Path) -> None:
    doc = base_config(tmp_path, [boxed(podman, model)])
    doc["supervisor"]["adopt_grace_s"] = 2
    d = Daemon(tmp_path, doc).start()
    try:
        d.wait_state("boxed", "ready", 60)
        label = _ours(d)
        assert len(podman.names(label)) == 1
        t0 = time.monotonic()
        d.crash()  # and no daemon comes back: the keeper's grace, then its stop
        wait_until(lambda: podman.names(label) == [], 2 + 5 + 30, what="container removed")
        took = time.monotonic() - t0
        assert took < 2 + 5 + 30, took
    finally:
        d.stop()


def test_a_stale_container_of_ours_goes_and_a_foreign_one_stays(tmp_path: Path,
                                                                podman: Podman,
                                                                model: Path) -> None:
    doc = base_config(tmp_path, [boxed(podman, model)])
    state = doc["supervisor"]["state_dir"]
    run = ["run", "-d", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
           "--network", "host", "-v", f"{model}:/model.gguf:ro"]
    serve = [IMAGE, "/bin/llama-server", "-m", "/model.gguf", "--host", "127.0.0.1", "-c",
             "512", "-t", "1"]
    podman(*run, "--name", "llm-boxed-deadbeef", "--label", f"{C.LABEL_STATE}={state}",
           "--label", f"{C.LABEL_KEEPER}=boxed-deadbeef", *serve, "--port", str(free_port()))
    podman(*run, "--name", "foreign-one", *serve, "--port", str(free_port()))
    podman(*run, "--name", "llm-boxed-0ther0ne", "--label", f"{C.LABEL_STATE}=/elsewhere",
           *serve, "--port", str(free_port()))
    try:
        with running(tmp_path, doc) as d:
            d.wait_state("boxed", "ready", 60)
            names = podman.names()
            assert "llm-boxed-deadbeef" not in names
            assert "foreign-one" in names and "llm-boxed-0ther0ne" in names
            assert "left by an earlier run: removing them" in d.logtext()
    finally:
        podman("rm", "-f", "-t", "0", "foreign-one", "llm-boxed-0ther0ne", check=False)


def test_a_keeper_killed_takes_its_container_with_it(tmp_path: Path, podman: Podman,
                                                     model: Path) -> None:
    with running(tmp_path, base_config(tmp_path, [boxed(podman, model)])) as d:
        d.wait_state("boxed", "ready", 60)
        cli = _cli_pid(d, "boxed")
        old = podman.names(_ours(d))
        keeper = int(Path(f"/proc/{cli}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert b"_keeper" in Path(f"/proc/{keeper}/cmdline").read_bytes()
        os.kill(keeper, signal.SIGKILL)
        wait_until(lambda: d.service("boxed")["pid"] not in (cli, None)
                   and d.service("boxed")["state"] == "ready", 60, what="restarted")
        wait_until(lambda: old[0] not in podman.names(_ours(d)), 30, what="old one removed")
        assert len(podman.names(_ours(d))) == 1


def test_a_crashed_daemon_s_container_is_adopted_by_the_next(tmp_path: Path, podman: Podman,
                                                             model: Path) -> None:
    """kill -9 of the daemon: the container keeps serving, the next daemon adopts it (same
    CLI, same container), and its stop removes it."""
    svc = boxed(podman, model)
    doc = base_config(tmp_path, [svc])
    d = Daemon(tmp_path, doc).start()
    try:
        cli = d.wait_state("boxed", "ready", 60)["pid"]
        names = podman.names(_ours(d))
        d.crash()
        d.pids_seen.clear()  # (d.stop() must not clean up what the next daemon adopts)
        assert _chat(svc["port"])["object"] == "chat.completion"  # no supervisor: it serves
    finally:
        d.stop()
    with running(tmp_path, doc) as d2:
        s = d2.wait_state("boxed", "ready", 60)
        assert s["pid"] == cli and podman.names(_ours(d2)) == names
        assert "adopted" in d2.logtext()
    assert podman.names(_ours(d2)) == []


# --- what a runtime leaves, says or fails to do -------------------------------------------------

FAKE_RUNTIME = """#!/bin/sh
# a container runtime that misbehaves: every call is written down; `run` records its name,
# leaves a process behind in a session of its own without our markers (as conmon and runc
# init of a container the runtime never recorded, when its CLI is killed while creating it),
# and fails; `rm` fails until RM_OK exists; `ps` lists the names not removed
echo "$*" >> "{log}"
verb=""; prev=""
for a in "$@"; do
  [ "$prev" = "--name" ] && name="$a"
  case "$a" in run|rm|stop|kill|ps) [ -z "$verb" ] && verb="$a" ;; esac
  prev="$a"
done
case "$verb" in
  run) echo "$name" >> "{names}"
       env -i setsid sleep 1000 < /dev/null > /dev/null 2>&1 &
       echo "creating..."; sleep 0.3; exit 1 ;;
  rm) if [ -e "{ok}" ]; then
        for a in "$@"; do grep -vx -- "$a" "{names}" > "{names}.tmp"; mv "{names}.tmp" "{names}"
        done
        exit 0
      fi
      echo "Error: boom: storage is locked" >&2; exit 2 ;;
  stop|kill) echo "Error: no such container" >&2; exit 125 ;;
  ps) cat "{names}"; exit 0 ;;
esac
exit 0
"""


def _sleepers() -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/cmdline").read_bytes() == b"sleep\x001000\x00":
                    out.append(int(entry))
    return out


def test_what_a_runtime_leaves_is_killed_and_a_failed_rm_retried(tmp_path: Path) -> None:
    """A run that leaves processes the runtime does not know (they are the keeper's, as its
    subreaper) has them killed before its exit is told; an `rm` that fails keeps the keeper
    from reusing the name (a new keeper runs), the keeper's stop and the daemon try again,
    and what is still there at the next start is removed by its sweep."""
    calls, ok, listed = tmp_path / "calls.log", tmp_path / "RM_OK", tmp_path / "names"
    listed.write_text("")
    fake = tmp_path / "fakepodman"
    fake.write_text(FAKE_RUNTIME.format(log=calls, ok=ok, names=listed))
    fake.chmod(0o755)
    before = set(_sleepers())
    svc = {"name": "leaky", "command": ["serve"], "container": {
        "image": "localhost/x:1", "runtime": str(fake)},
        "restart": {"policy": "always", "backoff_initial_s": 0.1, "backoff_max_s": 0.2,
                    "max_restarts": 100, "window_s": 60}, "stop": {"timeout_s": 1}}
    doc = base_config(tmp_path, [svc])
    try:
        with running(tmp_path, doc) as d:
            wait_until(lambda: "left after its removal" in d.logtext(), 30,
                       what="the leftover killed")
            wait_until(lambda: "could not be removed" in d.logtext(), 30, what="a new keeper")
            wait_until(lambda: len(listed.read_text().split()) >= 2, 30, what="a second name")
            first = listed.read_text().split()[0]
            # the keeper's stop tried again, then the daemon, the keeper gone
            wait_until(lambda: calls.read_text().count(f"rm -f {first}") >= 3, 60,
                       what=f"rm tried again: {calls.read_text()}")
            wait_until(lambda: f"ended without removing its container {first}"
                       in d.logtext(), 30, what="the daemon's try")
            assert "boom: storage is locked" in d.logtext()
        left = listed.read_text().split()
        assert first in left  # the runtime never removed it
        ok.touch()  # it works again: the next start removes what is left
        with running(tmp_path, doc) as d:
            wait_until(lambda: "left by an earlier run: removing them" in d.logtext(), 30,
                       what="the sweep")
            wait_until(lambda: not set(left) & set(listed.read_text().split()), 30,
                       what="the names left removed")
            assert "Traceback" not in d.logtext()
    finally:
        for pid in set(_sleepers()) - before:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    stray = set(_sleepers()) - before
    assert not stray, f"left running: {stray}"


def test_the_refusal_is_the_runtime_s_words_made_safe() -> None:
    evil = "\x1b]0;PWNED\x07\x1b[2J Error: evil"
    said = C.refusal("/usr/bin/podman", 125, ["starting", evil])
    assert said == ("podman refused to run the container: \\x1b]0;PWNED\\x07\\x1b[2J "
                    "Error: evil")
    # docker's reason has no "error" in it, and a pointer to --help follows it
    said = C.refusal("docker", 125, [
        "docker: Cannot connect to the Docker daemon at unix:///var/run/docker.sock.",
        "", "Run 'docker run --help' for more information"])
    assert said.endswith("docker: Cannot connect to the Docker daemon at "
                         "unix:///var/run/docker.sock.")
    assert C.refusal("podman", 127, ["Error: exec: nope: not found"]) \
        == "podman run exited 127 while starting: Error: exec: nope: not found"
    # a pull that failed: said so, with the runtime's words rather than the keeper's
    said = C.refusal("podman", 125, [
        "llm-supervisor keeper: docker.io/x:1 is not here: pulling it (for at most 60 s)",
        "Trying to pull docker.io/x:1...",
        "Error: initializing source docker://x:1: pinging container registry: no such host",
        "llm-supervisor keeper: pull: docker.io/x:1 failed (exit 125)"])
    assert said == ("podman could not pull the image: docker.io/x:1 failed (exit 125); Error: "
                    "initializing source docker://x:1: pinging container registry: no such "
                    "host")
    assert C.refusal("podman", 125, []).endswith("(it said nothing)")


@pytest.mark.parametrize(("args", "words"), [
    (["-td"], "'-td' is not for run_args: the runtime must stay in the foreground"),
    (["-dit"], "'-dit' is not for run_args"),
    (["--label", "io.llm-supervisor.state-dir=/elsewhere"], "are the supervisor's own"),
    (["--label=io.llm-supervisor.keeper=zzz"], "are the supervisor's own"),
    (["-l", "io.llm-supervisor.service=x"], "are the supervisor's own"),
    (["-l=io.llm-supervisor.state-dir=/x"], "are the supervisor's own"),
    (["-lio.llm-supervisor.keeper=nobody"], "are the supervisor's own"),
    (["--label-file", "/etc/labels"], "--label-file is not for run_args"),
    (["-td=true"], "'-td=true' is not for run_args"),
])
def test_run_args_cannot_undo_what_is_ours(args: list[str], words: str) -> None:
    from supervisord_llm.errors import ConfigError

    doc = ('[[service]]\nname = "a"\n[service.container]\nimage = "x"\nrun_args = '
           + json.dumps(args) + "\n")
    with pytest.raises(ConfigError, match=re.escape(words)):
        parse_config(doc)
    # a label of one's own, and a value written joined, are fine
    parse_config(doc.replace(json.dumps(args), json.dumps(
        ["--label", "team=ml", "--env=-d", "-it"])))


def test_a_trailing_newline_is_not_an_image() -> None:
    from supervisord_llm.errors import ConfigError

    for key in ("image", "network"):
        doc = ('[[service]]\nname = "a"\n[service.container]\n'
               + ('image = "x\\n"\n' if key == "image" else 'image = "x"\nnetwork = "host\\n"\n'))
        with pytest.raises(ConfigError, match=rf"container\.{key}: must be"):
            parse_config(doc)


def _runtime_strays() -> set[int]:
    """conmon and runc processes whose parent is PID 1: a container's monitor orphaned."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                exe = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == 1 and exe.rsplit(b"/", 1)[-1] in (b"conmon", b"runc"):
                    out.add(int(entry))
    return out


def _run_clis() -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"podman") and b"run" in argv and b"--rm" in argv:
                    out.add(int(entry))
    return out


def test_the_cli_killed_while_it_creates_the_container_leaves_nothing(
        tmp_path: Path, podman: Podman, model: Path) -> None:
    """kill -9 of `podman run` a few ms into the start (while it creates the container, a
    conmon and a `runc init` podman has not recorded yet; found by an attacker at 0.1 s):
    after each, the service is ready again and no conmon or runc is left under PID 1."""
    before = _runtime_strays()
    with running(tmp_path, base_config(tmp_path, [boxed(podman, model)])) as d:
        d.wait_state("boxed", "ready", 60)
        for delay in (0.02, 0.05, 0.08, 0.11, 0.15, 0.25):
            assert d.llmctl("stop", "boxed").returncode == 0
            seen = frozenset(_run_clis())

            def started(seen: frozenset[int] = seen) -> set[int]:
                return _run_clis() - seen

            starting = subprocess.Popen(  # (llmctl start waits for ready: not here)
                [sys.executable, "-m", "supervisord_llm.ctl", "--socket", d.socket, "start",
                 "boxed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            new = wait_until(started, 30, interval=0.002, what="the CLI")
            time.sleep(delay)
            with contextlib.suppress(OSError):
                os.kill(min(new), signal.SIGKILL)
            starting.wait(120)
            d.wait_state("boxed", "ready", 60)
            wait_until(lambda: len(podman.names(_ours(d))) == 1, 30, what="one container")
            # (one may pass through PID 1 while it ends; one that stays is the leak)
            wait_until(lambda: not _runtime_strays() - before, 15,
                       what=f"no conmon or runc under PID 1 after {delay} s: "
                            f"{_runtime_strays() - before} {d.logtext()[-2000:]}")
    assert podman.names(_ours(d)) == []
    wait_until(lambda: not _runtime_strays() - before, 15, what="no stray at the end")
    assert "Traceback" not in d.logtext()


def test_a_runtime_that_hangs_on_the_image_is_a_bounded_refusal(tmp_path: Path) -> None:
    """pull = "missing" with a runtime whose `image inspect` never answers: the start fails
    within pull_timeout_s, saying so, instead of looping on the start's timeout."""
    fake = tmp_path / "hangs"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = inspect ] && exec sleep 1000; done\n'
                    'exit 0\n')
    fake.chmod(0o755)
    svc = {"name": "stuck", "command": ["serve"], "port": free_port(),
           "container": {"image": "localhost/x:1", "runtime": str(fake), "pull": "missing",
                         "pull_timeout_s": 1},
           "health": {"interval_s": 0.5, "timeout_s": 0.5, "startup_timeout_s": 30}}
    with running(tmp_path, base_config(tmp_path, [svc])) as d:
        s = d.wait_state("stuck", "failed", 20)
        assert s["failed_reason"] == ("hangs could not pull the image: `image inspect "
                                      "localhost/x:1` did not answer within 1 s"), s
        assert s["restarts"] == 0
