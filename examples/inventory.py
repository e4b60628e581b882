#!/usr/bin/python3
"""Inventory: a line-oriented TCP service that reserves stock.

Every reservation is appended to a write-ahead log and fsync'ed before it
is acknowledged, so a failing disk turns into an error the caller sees.

  PING                -> PONG
  STOCK <sku>         -> STOCK <sku> <count>
  RESERVE <sku> <qty> -> OK <remaining> | ERR <reason>
"""
import os
import socketserver

PORT = int(os.environ.get("PORT", "15432"))
WAL = os.environ.get("WAL_PATH", "/tmp/faultbox-inventory.wal")
stock = {"widget": 100, "gadget": 5}


def persist(line):
    fd = os.open(WAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for raw in self.rfile:
            parts = raw.decode(errors="replace").split()
            if not parts:
                continue
            cmd = parts[0].upper()
            if cmd == "PING":
                reply = "PONG"
            elif cmd == "STOCK" and len(parts) == 2:
                reply = "STOCK %s %d" % (parts[1], stock.get(parts[1], 0))
            elif cmd == "RESERVE" and len(parts) == 3:
                sku, qty = parts[1], int(parts[2])
                if stock.get(sku, 0) < qty:
                    reply = "ERR out of stock"
                else:
                    try:
                        persist("reserve %s %d" % (sku, qty))
                        stock[sku] -= qty
                        reply = "OK %d" % stock[sku]
                    except OSError as e:
                        reply = "ERR wal: %s" % e.strerror
            else:
                reply = "ERR unknown command"
            self.wfile.write((reply + "\n").encode())


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


if __name__ == "__main__":
    with Server(("127.0.0.1", PORT), Handler) as server:
        server.serve_forever()
