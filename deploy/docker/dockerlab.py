"""The privileged Docker lab: nftsg's agent in a container, each instance in its own.

    .venv/bin/python deploy/docker/dockerlab.py up [examples/three-tier.yaml]
    .venv/bin/python deploy/docker/dockerlab.py check
    .venv/bin/python deploy/docker/dockerlab.py down [--images] [--stop-dockerd]

`up` does, as root on Debian 12:
1. starts dockerd (Debian's docker.io) if none answers, without a bridge and
   without iptables rules: every container of the lab has `--network none`;
2. builds the images without any registry: a Debian 12 root debootstrapped from
   the host's apt mirror with every package nftsg needs, `docker import`ed as
   `nftsg-base:bookworm-<digest>` (kept as the cache), then the nftsg image
   FROM it, installed by scripts/install.sh from a wheelhouse built here;
3. starts one `--network none` container per instance and external host of the
   topology, and the agent in a privileged container that shares the host's
   PID namespace, so it can name each instance container's network namespace
   as that host's lab namespace (deploy/docker/incontainer.py adopt);
4. runs `nftsg lab up` in the agent container: router namespaces first, rules
   in force, then the ENIs are plugged in (a veth from the router namespace
   into each container's namespace, addresses and routes as agent/lab.py does);
5. checks real traffic between the containers: a listener in every container,
   then from every container ping, TCP and UDP probes to every other one, run
   by processes of the containers themselves, compared with the verdicts of
   the reference evaluator.

Everything the lab creates carries the label `nftsg.lab=<prefix>`; the router
namespaces live in the agent container's mount namespace, so `down` (or
removing the containers) leaves nothing behind on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SUITE = "bookworm"
# Every Debian package scripts/install.sh asks for (so it installs none: the build has
# no network), python3-systemd for the unit's journald logs, systemd to boot the image.
BASE_PACKAGES = (
    "ca-certificates",
    "conntrack",
    "dbus",
    "gcc",
    "iperf3",
    "iproute2",
    "iputils-ping",
    "libc6-dev",
    "nftables",
    "procps",
    "python3",
    "python3-nftables",
    "python3-systemd",
    "python3-venv",
    "systemd",
    "systemd-sysv",
    "vagrant",
)
BASE_REPO = "nftsg-base"
LABEL = "nftsg.lab"
IN_IMAGE = "/opt/nftsg"
STATE_DIR = "/var/lib/nftsg"
TOPOLOGY_IN_AGENT = "/etc/nftsg-lab/topology.yaml"
DEFAULT_PREFIX = "dlab"
DEFAULT_IMAGE = "nftsg-lab:latest"
TCP_PORTS = (22, 80, 443, 5432, 8080)
UDP_PORTS = (5353,)
CACHE_DIR = Path(os.environ.get("NFTSG_DOCKER_CACHE", "/var/cache/nftsg-docker"))
DOCKERD_PIDFILE = Path("/run/nftsg-dockerd.pid")
DOCKERD_LOG = Path("/var/log/nftsg-dockerd.log")


class DockerLabError(Exception):
    """A step of the Docker lab that failed; the message says which and why."""


def log(message: str) -> None:
    print(f"==> {message}", flush=True)


# -- host packages and dockerd ----------------------------------------------------
def ensure_host_packages() -> None:
    """docker.io and debootstrap from Debian (deploy/docker/install.sh, idempotent)."""
    if shutil.which("dockerd") and shutil.which("debootstrap"):
        return
    subprocess.run(["bash", str(HERE / "install.sh")], check=True)


def _client() -> docker.DockerClient:
    return docker.DockerClient(base_url="unix:///var/run/docker.sock", version="auto", timeout=300)


def docker_client(start: bool = True, timeout: float = 60.0) -> tuple[docker.DockerClient, bool]:
    """A client of a running dockerd; starts one first if none answers (and `start`).

    Returns (client, started): `started` when this call started dockerd, which
    `stop_dockerd()` stops again. Ours runs without a bridge and without iptables
    rules, so it changes nothing in the host's network.
    """
    with contextlib.suppress(docker.errors.DockerException):
        client = _client()
        client.ping()
        return client, False
    if not start:
        raise DockerLabError("no dockerd answers on /var/run/docker.sock")
    ensure_host_packages()
    log("starting dockerd (no bridge, no iptables)")
    with open(DOCKERD_LOG, "ab") as out:
        proc = subprocess.Popen(
            ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    DOCKERD_PIDFILE.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = _client()
            client.ping()
            return client, True
        except docker.errors.DockerException:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DockerLabError(f"dockerd did not come up; see {DOCKERD_LOG}") from None
            time.sleep(0.2)


def stop_dockerd(timeout: float = 30.0) -> bool:
    """Stop the dockerd that docker_client() started (by its recorded pid)."""
    try:
        pid = int(DOCKERD_PIDFILE.read_text())
    except (OSError, ValueError):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    DOCKERD_PIDFILE.unlink(missing_ok=True)
    return True


# -- images -------------------------------------------------------------------------
def apt_mirror() -> str:
    """The host's Debian mirror (NFTSG_DOCKER_MIRROR wins), from its apt sources."""
    if os.environ.get("NFTSG_DOCKER_MIRROR"):
        return os.environ["NFTSG_DOCKER_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        # one-line style: deb [opts] URI SUITE ...
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if m.group(2) == SUITE and "security" not in m.group(1):
                return m.group(1)
        # deb822 style: URIs: ... / Suites: ...
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                if "security" not in uris.group(1):
                    return uris.group(1)
    return "http://deb.debian.org/debian"


def base_tag() -> str:
    digest = hashlib.sha256(f"{SUITE} {' '.join(BASE_PACKAGES)}".encode()).hexdigest()[:10]
    return f"{BASE_REPO}:{SUITE}-{digest}"


def ensure_base(client: docker.DockerClient) -> str:
    """The debootstrapped Debian 12 base image; built once, then reused."""
    tag = base_tag()
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(tag)
        return tag
    ensure_host_packages()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    mirror = apt_mirror()
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix="rootfs.") as tmp:
        root = Path(tmp) / "root"
        log(f"debootstrap {SUITE} from {mirror}")
        started = time.monotonic()
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(root),
                mirror,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # Use the same mirror inside, and keep the image small.
        (root / "etc/apt/sources.list").write_text(f"deb {mirror} {SUITE} main\n")
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        log(f"debootstrap done in {time.monotonic() - started:.0f} s; docker import as {tag}")
        archive = Path(tmp) / "root.tar"
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(root), "-cf", str(archive), "."], check=True
        )
        repo, _, version = tag.partition(":")
        client.api.import_image_from_file(str(archive), repository=repo, tag=version)
    return tag


def _repo_files() -> list[str]:
    """The repository's files for the image: git's view when this is a checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
            check=True,
            capture_output=True,
        ).stdout
        return sorted(f for f in out.decode().split("\0") if f and (REPO / f).is_file())
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
        files = []
        for dirpath, dirnames, filenames in os.walk(REPO):
            dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(dirpath, f), REPO) for f in filenames]
        return sorted(files)


def build_wheelhouse() -> Path:
    """Wheels of nftsg's Python dependencies (test extras too), built by this host's pip.

    The image installs from them with no index: the build needs no network.
    """
    wheelhouse = CACHE_DIR / "wheelhouse"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    log("wheelhouse of nftsg's Python dependencies")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--disable-pip-version-check",
            "-w",
            str(wheelhouse),
            "pip",
            "setuptools>=68",
            "wheel",
            f"{REPO}[test]",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise DockerLabError(f"pip wheel failed:\n{done.stdout}{done.stderr}")
    for stale in wheelhouse.glob("nftsg-*.whl"):  # the project itself comes as source
        stale.unlink()
    return wheelhouse


def build_context(wheelhouse: Path) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(HERE / "Dockerfile", arcname="Dockerfile")
        for name in _repo_files():
            tar.add(REPO / name, arcname=f"nftsg/{name}", recursive=False)
        tar.add(wheelhouse, arcname="wheelhouse")
    buf.seek(0)
    return buf


def build_image(client: docker.DockerClient, tag: str, base: str) -> str:
    """The nftsg image FROM `base`, installed by scripts/install.sh, offline."""
    context = build_context(build_wheelhouse())
    log(f"docker build {tag} (FROM {base}, no network)")
    lines: list[str] = []
    for chunk in client.api.build(
        fileobj=context,
        custom_context=True,
        tag=tag,
        buildargs={"BASE": base},
        network_mode="none",
        rm=True,
        forcerm=True,
        decode=True,
        labels={LABEL: "image"},
    ):
        if "stream" in chunk:
            lines.append(chunk["stream"])
        if "error" in chunk:
            tail = "".join(lines[-30:])
            raise DockerLabError(f"docker build {tag} failed: {chunk['error']}\n{tail}")
    return tag


def ensure_images(client: docker.DockerClient, tag: str, rebuild: bool = True) -> str:
    base = ensure_base(client)
    if not rebuild:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.get(tag)
            return tag
    return build_image(client, tag, base)


# -- containers -------------------------------------------------------------------
CAPABILITIES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
    "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
    "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ"
).split()  # the ones Docker 20.10 knows (it refuses CAP_PERFMON, CAP_BPF by name)


def host_capabilities() -> list[str] | None:
    """The capabilities this process may pass on, or None when it holds them all.

    `--privileged` asks runc for every capability the kernel knows; where the
    host's bounding set lacks one (seen: CAP_SYS_RESOURCE in a VM sandbox) runc
    fails with "unable to apply caps: operation not permitted".
    """
    status = Path("/proc/self/status").read_text()
    bounding = int(re.search(r"^CapBnd:\s*([0-9a-f]+)", status, re.M).group(1), 16)  # type: ignore[union-attr]
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    if all(bounding >> bit & 1 for bit in range(last + 1)):
        return None
    return [f"CAP_{name}" for bit, name in enumerate(CAPABILITIES) if bounding >> bit & 1]


def run_container(
    client: docker.DockerClient,
    image: str,
    command: list[str],
    *,
    name: str,
    labels: dict[str, str],
    privileged: bool = False,
    hostname: str | None = None,
    pid_mode: str | None = None,
    init: bool = True,
    binds: list[str] | None = None,
    tmpfs: dict[str, str] | None = None,
    environment: dict[str, str] | None = None,
    cgroupns: str | None = None,
) -> Container:
    """Create and start a `--network none` container.

    privileged: `--privileged` where the host can grant it; otherwise the same
    by parts: every capability the host holds, no seccomp or AppArmor profile,
    all devices, and /proc and /sys neither masked nor read-only.
    """
    kwargs: dict[str, Any] = {"network_mode": "none", "init": init, "binds": binds or []}
    if not privileged:
        # Docker turns IPv6 off in a `--network none` namespace; the ENIs need it.
        kwargs["sysctls"] = {
            "net.ipv6.conf.all.disable_ipv6": "0",
            "net.ipv6.conf.default.disable_ipv6": "0",
        }
    if pid_mode:
        kwargs["pid_mode"] = pid_mode
    if tmpfs:
        kwargs["tmpfs"] = tmpfs
    caps = host_capabilities() if privileged else None
    if privileged and caps is None:
        kwargs["privileged"] = True
    elif privileged:
        kwargs.update(
            cap_add=caps,
            security_opt=["seccomp=unconfined", "apparmor=unconfined"],
            devices=[],
            device_cgroup_rules=["a *:* rwm"],
        )
    host_config = client.api.create_host_config(**kwargs)
    if privileged and caps is not None:
        host_config["MaskedPaths"] = []
        host_config["ReadonlyPaths"] = []
    if cgroupns:
        host_config["CgroupnsMode"] = cgroupns
    created = client.api.create_container(
        image,
        command,
        hostname=hostname,
        name=name,
        labels=labels,
        environment=environment,
        host_config=host_config,
    )
    client.api.start(created["Id"])
    return client.containers.get(created["Id"])


# -- the lab ------------------------------------------------------------------------
@dataclass
class DockerLab:
    client: docker.DockerClient
    prefix: str = DEFAULT_PREFIX
    image: str = DEFAULT_IMAGE
    hosts: dict[str, Container] = field(default_factory=dict)  # instance/external -> container
    agent: Container | None = None

    def container_name(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL: self.prefix}

    # -- up ---------------------------------------------------------------------
    def up(self, topology: Path) -> str:
        """Containers, agent, `nftsg lab up`; returns lab up's output."""
        if self.containers():
            raise DockerLabError(
                f"a Docker lab with prefix {self.prefix!r} exists; run `dockerlab.py down` first"
            )
        names = self.host_names(topology)
        log(f"starting {len(names)} host containers (--network none) and the agent")
        for name in names:
            self.hosts[name] = run_container(
                self.client,
                self.image,
                ["sleep", "infinity"],
                name=self.container_name(name),
                hostname=name,
                labels={**self.labels, "nftsg.host": name},
            )
        self.agent = run_container(
            self.client,
            self.image,
            ["nftsg", "agent", "--state-dir", STATE_DIR, "--prefix", self.prefix],
            name=self.container_name("agent"),
            hostname="nftsg-agent",
            pid_mode="host",  # to reach each host container's namespace by its pid
            privileged=True,
            labels={**self.labels, "nftsg.host": "agent"},
        )
        self._put_topology(topology)
        pids = []
        for name, container in self.hosts.items():
            container.reload()
            pids.append(f"{name}={container.attrs['State']['Pid']}")
        self.exec_agent(
            [
                "python",
                f"{IN_IMAGE}/deploy/docker/incontainer.py",
                "adopt",
                "--prefix",
                self.prefix,
                TOPOLOGY_IN_AGENT,
                *pids,
            ]
        )
        return self.exec_agent(
            [
                "nftsg",
                "lab",
                "up",
                TOPOLOGY_IN_AGENT,
                "--prefix",
                self.prefix,
                "--state-dir",
                STATE_DIR,
            ]
        )

    def host_names(self, topology: Path) -> list[str]:
        import yaml

        data = yaml.safe_load(topology.read_text())
        names = [i["instance_id"] for i in data.get("instances") or []]
        return names + [x["name"] for x in data.get("external_hosts") or []]

    def _put_topology(self, topology: Path) -> None:
        assert self.agent is not None
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(topology, arcname=Path(TOPOLOGY_IN_AGENT).name)
        self.agent.exec_run(["mkdir", "-p", str(Path(TOPOLOGY_IN_AGENT).parent)])
        self.agent.put_archive(str(Path(TOPOLOGY_IN_AGENT).parent), buf.getvalue())

    def exec_agent(self, cmd: list[str]) -> str:
        agent = self.agent or self.client.containers.get(self.container_name("agent"))
        code, out = agent.exec_run(cmd)
        text = out.decode(errors="replace")
        if code != 0:
            raise DockerLabError(f"in the agent container, {' '.join(cmd)} exited {code}:\n{text}")
        return text

    def attach(self) -> None:
        """Find the containers of a lab that is up (for `check` and `down`)."""
        for c in self.containers():
            host = c.labels.get("nftsg.host", "")
            if host == "agent":
                self.agent = c
            elif host:
                self.hosts[host] = c

    def containers(self) -> list[Container]:
        return list(
            self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.prefix}"})
        )

    # -- traffic ----------------------------------------------------------------
    def check(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Real traffic between the containers vs the evaluator; one record per probe."""
        if self.agent is None:
            self.attach()
        plan = json.loads(
            self.exec_agent(
                [
                    "python",
                    f"{IN_IMAGE}/deploy/docker/incontainer.py",
                    "plan",
                    TOPOLOGY_IN_AGENT,
                    "--tcp",
                    *map(str, TCP_PORTS),
                    "--udp",
                    *map(str, UDP_PORTS),
                ]
            )
        )
        self._start_listeners()
        by_src: dict[str, list[dict[str, Any]]] = {}
        for probe in plan:
            by_src.setdefault(probe["src"], []).append(probe)

        def run_from(src: str, probes: list[dict[str, Any]], wait: float) -> list[dict[str, Any]]:
            wire = [
                {k: p[k] for k in ("kind", "src_ip", "dst_ip", "port", "sport")} for p in probes
            ]
            code, out = self.hosts[src].exec_run(
                [
                    "python3",
                    f"{IN_IMAGE}/deploy/docker/traffic.py",
                    "probe",
                    json.dumps(wire),
                    "--timeout",
                    str(wait),
                ]
            )
            if code != 0:
                raise DockerLabError(f"probes from {src} failed: {out.decode(errors='replace')}")
            results = json.loads(out)
            return [
                {**p, "observed": r["ok"], "detail": r["detail"]}
                for p, r in zip(probes, results, strict=True)
            ]

        with ThreadPoolExecutor(max_workers=len(by_src) or 1) as pool:
            outcomes = [
                o
                for part in pool.map(lambda kv: run_from(*kv, timeout), by_src.items())
                for o in part
            ]
        # Confirm disagreements with a longer wait (two busy cores can stall a probe).
        wrong = [o for o in outcomes if o["observed"] != o["expected"]]
        if wrong:
            again: dict[str, list[dict[str, Any]]] = {}
            for o in wrong:
                again.setdefault(o["src"], []).append(o)
            confirmed = {
                id(o): r
                for src, ps in again.items()
                for o, r in zip(ps, run_from(src, ps, timeout * 4), strict=True)
            }
            outcomes = [
                {**confirmed[id(o)], "detail": confirmed[id(o)]["detail"] + " (confirmed)"}
                if id(o) in confirmed
                else o
                for o in outcomes
            ]
        return outcomes

    def _start_listeners(self, timeout: float = 20.0) -> None:
        tcp, udp = ",".join(map(str, TCP_PORTS)), ",".join(map(str, UDP_PORTS))
        for container in self.hosts.values():
            code, _ = container.exec_run(["test", "-e", "/run/nftsg-traffic.ready"])
            if code == 0:
                continue
            container.exec_run(
                [
                    "python3",
                    f"{IN_IMAGE}/deploy/docker/traffic.py",
                    "serve",
                    "--tcp",
                    tcp,
                    "--udp",
                    udp,
                ],
                detach=True,
            )
        deadline = time.monotonic() + timeout
        for name, container in self.hosts.items():
            while container.exec_run(["test", "-e", "/run/nftsg-traffic.ready"])[0] != 0:
                if time.monotonic() > deadline:
                    raise DockerLabError(f"the traffic listener in {name} did not start")
                time.sleep(0.1)

    # -- down ---------------------------------------------------------------------
    def down(self) -> int:
        """Stop the agent's lab and remove every container of this prefix; idempotent."""
        # No `nftsg lab down` first: the router namespaces and the names of the
        # adopted ones live in the agent container's mount namespace, so removing
        # it frees them (and an exec racing the agent's exit can hang dockerd 20.10).
        containers = self.containers()
        for c in containers:
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True)
        self.hosts.clear()
        self.agent = None
        return len(containers)


def render(outcomes: list[dict[str, Any]], verbose: bool = False) -> str:
    lines = []
    for o in outcomes:
        agrees = o["observed"] == o["expected"]
        if verbose or not agrees:
            mark = "ok " if agrees else "MISMATCH"
            verdict = "allowed" if o["observed"] else "dropped"
            lines.append(f"  {mark} {verdict:8} {o['label']}: {o['detail']}")
    agree = sum(o["observed"] == o["expected"] for o in outcomes)
    allowed = sum(bool(o["observed"]) for o in outcomes)
    lines.append(
        f"{agree}/{len(outcomes)} probes between containers agree with the evaluator "
        f"({allowed} allowed, {len(outcomes) - allowed} dropped)"
    )
    return "\n".join(lines)


def remove_image(client: docker.DockerClient, tag: str) -> None:
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.remove(tag, force=True)


@contextlib.contextmanager
def timed(what: str, timings: dict[str, float]) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        timings[what] = time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dockerlab.py", description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="name prefix (no '-')")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="tag of the nftsg image")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build images, start containers and agent, check traffic")
    up.add_argument("file", nargs="?", default=str(REPO / "examples/three-tier.yaml"))
    up.add_argument("--no-rebuild", action="store_true", help="reuse the nftsg image if present")
    up.add_argument("--no-check", action="store_true")
    sub.add_parser("build", help="build the base and nftsg images only")
    check = sub.add_parser("check", help="real traffic between the containers vs the evaluator")
    check.add_argument("-v", "--verbose", action="store_true", help="every probe, not only misses")
    down = sub.add_parser("down", help="remove every container of the lab")
    down.add_argument("--images", action="store_true", help="remove the nftsg image too")
    down.add_argument("--stop-dockerd", action="store_true", help="stop the dockerd up started")
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        print("dockerlab: run as root", file=sys.stderr)
        return 2
    timings: dict[str, float] = {}
    try:
        client, _started = docker_client(start=args.command != "down")
        lab = DockerLab(client, args.prefix, args.image)
        if args.command == "build":
            with timed("images", timings):
                ensure_images(client, args.image)
        elif args.command == "up":
            with timed("images", timings):
                ensure_images(client, args.image, rebuild=not args.no_rebuild)
            try:
                with timed("lab up", timings):
                    print(lab.up(Path(args.file)), end="")
            except Exception:
                lab.down()
                raise
            if not args.no_check:
                with timed("check", timings):
                    outcomes = lab.check()
                print(render(outcomes))
                if any(o["observed"] != o["expected"] for o in outcomes):
                    return 1
            print(f"containers: {', '.join(c.name for c in lab.containers())}")
            print(f"  try: docker exec -it {lab.container_name('i-bastion')} bash")
            print(f"  stop: {sys.argv[0]} down")
        elif args.command == "check":
            with timed("check", timings):
                outcomes = lab.check()
            print(render(outcomes, verbose=args.verbose))
            return 0 if all(o["observed"] == o["expected"] for o in outcomes) else 1
        elif args.command == "down":
            print(f"removed {lab.down()} containers")
            if args.images:
                remove_image(client, args.image)
            if args.stop_dockerd and stop_dockerd():
                print("stopped dockerd")
    except (DockerLabError, docker.errors.DockerException, subprocess.CalledProcessError) as exc:
        print(f"dockerlab: {exc}", file=sys.stderr)
        return 2
    finally:
        if timings:
            print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
