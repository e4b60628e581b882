"""A small HTTP service for container tests.

  GET /health            -> 200 ok
  GET /hello             -> 200 hello from $HOSTNAME
  GET /fetch?env=NAME    -> the status and body of GET http://$NAME/hello
                            (NAME holds a host:port), or 502 with the
                            error when that fails
  GET /argv              -> the arguments it was started with
  GET /env?name=X        -> the value of environment variable X
  GET /file?path=P       -> the file's contents, or 500 with the errno name
  GET /redis?env=NAME&cmd=C -> the first line Redis (at $NAME, host:port)
                            answers to the inline command C, or 502
  GET /redis?addr=H:P&cmd=C -> the same at H:P as given (no variable, so
                            faultbox does not point it at a proxy)

With TLS_CERT and TLS_KEY (PEM files) it serves HTTPS instead.
"""
import errno
import os
import socket
import ssl
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PORT = int(os.environ.get("PORT", "8080"))


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/health":
            self.reply(200, "ok")
        elif url.path == "/hello":
            self.reply(200, "hello from %s" % os.environ.get("HOSTNAME", "?"))
        elif url.path == "/fetch":
            try:
                addr = os.environ.get(q.get("env", ""), "")
                with urllib.request.urlopen("http://%s/hello" % addr, timeout=5) as r:
                    self.reply(200, "%d %s" % (r.status, r.read().decode()))
            except urllib.error.HTTPError as e:
                self.reply(200, "%d %s" % (e.code, e.read().decode()))
            except Exception as e:
                self.reply(502, "error %s" % e)
        elif url.path == "/redis":
            try:
                addr = q.get("addr") or os.environ.get(q.get("env", ""), "")
                host, port = addr.rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=5) as c:
                    c.sendall(q.get("cmd", "PING").encode() + b"\r\n")
                    line = c.makefile("rb").readline().decode().rstrip("\r\n")
                self.reply(200, line)
            except Exception as e:
                self.reply(502, "error %s" % e)
        elif url.path == "/argv":
            self.reply(200, " ".join(sys.argv[1:]))
        elif url.path == "/env":
            self.reply(200, os.environ.get(q.get("name", ""), ""))
        elif url.path == "/file":
            try:
                with open(q["path"]) as f:
                    self.reply(200, f.read())
            except OSError as e:
                self.reply(500, errno.errorcode.get(e.errno, str(e.errno)))
        else:
            self.reply(404, "not found")

    def log_message(self, fmt, *args):
        sys.stderr.write("http: " + (fmt % args) + "\n")


server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
if os.environ.get("TLS_CERT"):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.environ["TLS_CERT"], os.environ["TLS_KEY"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
print("listening on %d (%s), argv %s" % (PORT, "https" if os.environ.get("TLS_CERT") else "http", sys.argv[1:]), flush=True)
server.serve_forever()
