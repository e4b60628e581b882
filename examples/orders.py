#!/usr/bin/python3
"""Orders: an HTTP service that confirms an order once inventory has
reserved (and durably logged) the stock.

  GET  /health -> 200
  POST /orders {"sku": "...", "qty": N}
       -> 200 {"status": "confirmed", "remaining": N}
       -> 409 {"status": "rejected", "error": "..."}   (inventory said no)
       -> 503 {"status": "failed", "error": "..."}     (inventory unreachable or failing)
"""
import json
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("PORT", "18080"))
INVENTORY = os.environ.get("INVENTORY_ADDR", "localhost:15432")


def reserve(sku, qty):
    host, port = INVENTORY.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(("RESERVE %s %d\n" % (sku, qty)).encode())
        return s.makefile().readline().strip()


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, doc):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self.reply(200, {"status": "ok"})
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        if self.path != "/orders":
            return self.reply(404, {"error": "not found"})
        length = int(self.headers.get("Content-Length", "0"))
        try:
            order = json.loads(self.rfile.read(length) or b"{}")
            sku, qty = order["sku"], int(order.get("qty", 1))
        except (ValueError, KeyError) as e:
            return self.reply(400, {"error": "bad order: %s" % e})
        try:
            answer = reserve(sku, qty)
        except OSError as e:
            return self.reply(503, {"status": "failed", "error": "inventory unreachable: %s" % e})
        if not answer:
            return self.reply(503, {"status": "failed", "error": "inventory closed the connection without answering"})
        if answer.startswith("OK"):
            return self.reply(200, {"status": "confirmed", "remaining": int(answer.split()[1])})
        if answer.startswith("ERR wal"):
            return self.reply(503, {"status": "failed", "error": "inventory: %s" % answer[4:]})
        return self.reply(409, {"status": "rejected", "error": answer[4:]})

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
