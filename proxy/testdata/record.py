#!/usr/bin/env python3
"""Record one real TCP session into a pair of raw byte files.

The recorder sits between a real client and a real server, both on
127.0.0.1:

    client  --->  record.py (127.0.0.1:LISTEN)  --->  server (127.0.0.1:UPSTREAM)

It accepts exactly ONE client connection, opens one connection to the
server, and relays bytes both ways without looking at them.  Every chunk
read from the client is forwarded to the server and appended to
``<out>.c2s``; every chunk read from the server is forwarded to the client
and appended to ``<out>.s2c``.  The files therefore hold exactly the bytes
that crossed the wire in each direction (plain TCP only, no TLS).

When one side stops sending (EOF), the recorder half-closes the other side
(``shutdown(SHUT_WR)``) and keeps relaying the remaining direction, so a
client that writes a pipeline and then half-closes still gets (and we still
record) every reply.  The session ends when both directions have reached
EOF, when a side resets the connection, or when nothing moves for
``--idle`` seconds after the first EOF.

Usage, either run the client yourself:

    python3 record.py --upstream 16379 --out redis/basic --port-file /tmp/p &
    redis-cli -p "$(cat /tmp/p)" ...

or let the recorder start the client, with ``{port}`` replaced by the
listening port (stdin is passed through to the client):

    printf 'PING\\n' | python3 record.py --upstream 16379 --out redis/basic \\
        -- redis-cli -p {port}

Standard library only.
"""

import argparse
import os
import selectors
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", type=int, required=True,
                   help="port of the real server on 127.0.0.1")
    p.add_argument("--out", required=True,
                   help="output path without extension; writes OUT.c2s and OUT.s2c")
    p.add_argument("--listen", type=int, default=0,
                   help="port to listen on (default 0: pick a free port)")
    p.add_argument("--port-file",
                   help="write the listening port to this file once listening")
    p.add_argument("--idle", type=float, default=2.0,
                   help="seconds of silence after the first EOF before giving up")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the client to connect")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="optional client command after '--'; {port} is substituted")
    args = p.parse_args()
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    return args


def relay(client, server, c2s_file, s2c_file, idle):
    """Copy bytes both ways until both directions are done.

    Each direction is a (source socket, destination socket, file) triple.
    We use one selector over both sockets so the order of reads mirrors
    the order the bytes arrived in.
    """
    directions = {
        client: (server, c2s_file, "c2s"),
        server: (client, s2c_file, "s2c"),
    }
    sel = selectors.DefaultSelector()
    for sock in directions:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    open_dirs = set(directions)      # sources that have not hit EOF yet
    first_eof = None                 # time of the first EOF, for --idle
    totals = {"c2s": 0, "s2c": 0}

    while open_dirs:
        timeout = None if first_eof is None else idle
        events = sel.select(timeout)
        if not events:
            print("record.py: idle after EOF, stopping", file=sys.stderr)
            break
        for key, _ in events:
            src = key.fileobj
            dst, out, name = directions[src]
            try:
                data = src.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = None
            if data:
                # Record first, then forward: the file is what the peer
                # sent, whether or not the other side is still listening.
                out.write(data)
                out.flush()
                totals[name] += len(data)
                try:
                    _sendall(dst, data)
                except (ConnectionResetError, BrokenPipeError):
                    open_dirs.clear()
                continue
            # EOF (b"") or reset (None) on this direction.
            sel.unregister(src)
            open_dirs.discard(src)
            if first_eof is None:
                first_eof = time.monotonic()
            if data is None:
                open_dirs.clear()    # a reset ends the whole session
                break
            try:
                dst.shutdown(socket.SHUT_WR)   # pass the half-close on
            except OSError:
                pass
    sel.close()
    return totals


def _sendall(sock, data):
    """sendall on a non-blocking socket: wait for writability as needed."""
    view = memoryview(data)
    with selectors.DefaultSelector() as wsel:
        wsel.register(sock, selectors.EVENT_WRITE)
        while view:
            try:
                n = sock.send(view)
                view = view[n:]
            except BlockingIOError:
                wsel.select()


def main():
    args = parse_args()
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, args.listen))
    listener.listen(1)
    port = listener.getsockname()[1]
    print(f"record.py: listening on {HOST}:{port} -> {HOST}:{args.upstream}",
          file=sys.stderr)
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{port}\n")
        os.replace(args.port_file + ".tmp", args.port_file)

    child = None
    if args.command:
        cmd = [a.replace("{port}", str(port)) for a in args.command]
        child = subprocess.Popen(cmd)   # inherits our stdin/stdout

    listener.settimeout(args.timeout)
    client, _ = listener.accept()
    listener.close()                    # exactly one connection
    server = socket.create_connection((HOST, args.upstream))

    # Truncate, then append every chunk as it is relayed.
    with open(args.out + ".c2s", "wb") as c2s, open(args.out + ".s2c", "wb") as s2c:
        totals = relay(client, server, c2s, s2c, args.idle)
    client.close()
    server.close()
    print(f"record.py: {args.out}: c2s {totals['c2s']} bytes, "
          f"s2c {totals['s2c']} bytes", file=sys.stderr)

    if child is not None:
        return child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
