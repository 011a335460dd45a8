"""Real traffic between the Docker lab's containers (standard library only).

Runs inside the instance containers with Debian's python3, as processes of
those containers:

  traffic.py serve --tcp 22,80 --udp 5353
      listens on every address of the container (IPv4 and IPv6) on those
      ports; a TCP peer gets a line naming the address and port it came from,
      a UDP datagram is answered with the same line. Writes READY_FILE once
      every socket is bound.
  traffic.py probe JSON
      JSON is a list of {"kind": "ping"|"tcp"|"udp", "src_ip", "dst_ip",
      "port", "sport"}; prints a JSON list of {"ok", "detail"}, one per probe,
      in order. A TCP or UDP probe counts as allowed only when the listener's
      answer names the probe's own source address and port.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import selectors
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

READY_FILE = Path("/run/nftsg-traffic.ready")


def _dual_stack(kind: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    return sock


def _peer(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host = addr[0]
    if host.startswith("::ffff:"):  # an IPv4 peer of the dual-stack socket
        host = host[len("::ffff:") :]
    return f"{host} {addr[1]}\n"


def serve(tcp: list[int], udp: list[int]) -> None:
    sel = selectors.DefaultSelector()
    for port in tcp:
        sock = _dual_stack(socket.SOCK_STREAM, port)
        sock.listen(64)
        sel.register(sock, selectors.EVENT_READ, "tcp")
    for port in udp:
        sel.register(_dual_stack(socket.SOCK_DGRAM, port), selectors.EVENT_READ, "udp")
    READY_FILE.write_text("ready\n")
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if key.data == "tcp":
                    conn, addr = sock.accept()
                    with conn:
                        conn.settimeout(1.0)
                        conn.sendall(_peer(addr).encode())
                else:
                    _data, addr = sock.recvfrom(2048)
                    sock.sendto(_peer(addr).encode(), addr)
            except OSError:
                continue


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def _answer_names(answer: bytes, src_ip: str, sport: int) -> tuple[bool, str]:
    text = answer.decode(errors="replace").strip()
    want = f"{ipaddress.ip_address(src_ip)} {sport}"
    if text == want:
        return True, f"answered, seen from {src_ip}:{sport}"
    return False, f"answered but saw {text!r}, not {want!r}"


def probe_one(p: dict[str, object], timeout: float) -> dict[str, object]:
    kind, src, dst = str(p["kind"]), str(p["src_ip"]), str(p["dst_ip"])
    if kind == "ping":
        done = subprocess.run(
            ["ping", "-n", "-q", "-c1", f"-W{max(1, round(timeout))}", "-I", src, dst],
            capture_output=True,
            text=True,
        )
        return {
            "ok": done.returncode == 0,
            "detail": "echo reply" if done.returncode == 0 else "no echo reply",
        }
    port, sport = int(str(p["port"])), int(str(p.get("sport") or 0))
    kind_const = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(_family(dst), kind_const) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((src, sport))
        sport = sock.getsockname()[1]
        sock.settimeout(timeout)
        try:
            if kind == "tcp":
                sock.connect((dst, port))
                answer = sock.recv(256)
            else:
                sock.sendto(b"probe\n", (dst, port))
                answer, _ = sock.recvfrom(256)
        except TimeoutError:
            return {"ok": False, "detail": f"no answer in {timeout:.1f} s"}
        except ConnectionRefusedError:
            return {"ok": False, "detail": "refused (nothing listens there)"}
        except OSError as exc:
            return {"ok": False, "detail": f"error: {exc.strerror or exc}"}
    ok, detail = _answer_names(answer, src, sport)
    return {"ok": ok, "detail": detail}


def probe(probes: list[dict[str, object]], timeout: float) -> list[dict[str, object]]:
    with ThreadPoolExecutor(max_workers=min(64, max(1, len(probes)))) as pool:
        return list(pool.map(lambda p: probe_one(p, timeout), probes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="traffic.py")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--tcp", default="")
    s.add_argument("--udp", default="")
    p = sub.add_parser("probe")
    p.add_argument("probes", help="JSON list of probes")
    p.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        ports = [[int(x) for x in text.split(",") if x] for text in (args.tcp, args.udp)]
        serve(ports[0], ports[1])
        return 0
    json.dump(probe(json.loads(args.probes), args.timeout), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
