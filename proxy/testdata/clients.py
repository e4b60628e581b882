#!/usr/bin/env python3
"""Small clients and servers used to record the fixtures next to this file.

Where a real command-line client exists (redis-cli, psql, mariadb, curl)
the fixtures use it.  This file covers the rest with the standard library:

    clients.py redis-pipelined PORT     several RESP commands in one write
    clients.py redis-big PORT           SET and GET of a ~200 KB bulk value
    clients.py memcached PORT           text-protocol session
    clients.py memcached-pipelined PORT text-protocol commands in one write
    clients.py pg-extended PORT         extended query protocol via libpq (ctypes)
    clients.py pg-pipeline PORT         libpq pipeline mode, an error mid-batch
    clients.py echo-server PORT         line echo server (runs until killed)
    clients.py echo-client PORT         sends two lines, reads the echoes
    clients.py http-server PORT         HTTP/1.1 server for the curl sessions

Each client talks to 127.0.0.1:PORT (normally the record.py port), waits
for each reply before going on unless the session is meant to pipeline,
and closes the connection at the end.
"""

import ctypes
import ctypes.util
import http.server
import socket
import socketserver
import sys

HOST = "127.0.0.1"


# --- helpers ----------------------------------------------------------------

def connect(port):
    return socket.create_connection((HOST, port))


def read_until(sock, done):
    """Read until done(buffer) is true; return the buffer."""
    buf = b""
    while not done(buf):
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit(f"connection closed early, have {buf!r}")
        buf += chunk
    return buf


def resp(*args):
    """Encode one command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


# --- redis --------------------------------------------------------------------

def redis_pipelined(port):
    # All commands go out in ONE write; the replies come back in order.
    cmds = [
        resp("SET", "a", "1"),
        resp("SET", "b", "hello world"),
        resp("MGET", "a", "b", "nope"),
        resp("INCR", "a"),
        resp("DEL", "b"),
        resp("EXISTS", "b"),
        resp("HSET", "h", "f1", "v1", "f2", "v2"),
        resp("HGETALL", "h"),
        resp("GET", "h"),            # WRONGTYPE error in the middle
        resp("ECHO", "bye"),
        resp("PING"),
    ]
    s = connect(port)
    s.sendall(b"".join(cmds))
    read_until(s, lambda b: b.endswith(b"+PONG\r\n"))
    s.close()


def redis_big(port):
    # 200,000 bytes made of "000000\r\n" lines: a large bulk string whose
    # body is full of CRLFs, so a parser must go by the length prefix.
    value = b"".join(b"%06d\r\n" % i for i in range(25000))
    assert len(value) == 200000
    s = connect(port)
    s.sendall(resp("SET", "big", value))
    read_until(s, lambda b: b == b"+OK\r\n")
    s.sendall(resp("GET", "big"))
    expect = b"$200000\r\n" + value + b"\r\n"
    got = read_until(s, lambda b: len(b) >= len(expect))
    assert got == expect, "GET big returned something else"
    s.close()


# --- memcached ----------------------------------------------------------------

def memcached(port):
    # (request bytes, reply is a retrieval ending in END)
    steps = [
        (b"set k 0 0 1\r\nv\r\n", False),       # STORED
        (b"get k\r\n", True),                    # VALUE k 0 1 / v / END
        (b"get missing\r\n", True),              # END
        (b"incr n 1\r\n", False),                # NOT_FOUND
        (b"set n 0 0 1\r\n5\r\n", False),        # STORED
        (b"incr n 3\r\n", False),                # 8
        (b"gets k\r\n", True),                   # VALUE k 0 1 <cas> / v / END
        (b"incr k 1\r\n", False),                # CLIENT_ERROR non-numeric
        (b"set a 5 0 2\r\naa\r\n", False),       # STORED (flags 5)
        (b"set c 0 0 3\r\nccc\r\n", False),      # STORED
        (b"get a b c\r\n", True),                # two VALUEs, b missing, END
        (b"delete k\r\n", False),                # DELETED
        (b"delete k\r\n", False),                # NOT_FOUND
        (b"bogus\r\n", False),                   # ERROR
        (b"version\r\n", False),                 # VERSION 1.6.18
    ]
    s = connect(port)
    for req, retrieval in steps:
        s.sendall(req)
        if retrieval:
            read_until(s, lambda b: b.endswith(b"END\r\n"))
        else:
            read_until(s, lambda b: b.endswith(b"\r\n"))
    s.close()


def memcached_pipelined(port):
    # Storage, retrieval and a noreply set, all in ONE write.
    req = (b"set x 0 0 5\r\nhello\r\n"
           b"set y 0 0 3 noreply\r\nabc\r\n"     # no reply line at all
           b"get x y z\r\n"
           b"append x 0 0 6\r\n world\r\n"
           b"gets x\r\n"
           b"touch x 100\r\n"
           b"version\r\n")
    s = connect(port)
    s.sendall(req)
    read_until(s, lambda b: b.endswith(b"\r\n") and b"VERSION " in b)
    s.close()


# --- postgres: extended query protocol through the real libpq ----------------

def pg_extended(port):
    """Drive libpq (libpq.so.5) through ctypes.

    psql 15 has no \\bind, and pgbench opens two connections, so we call
    libpq's own PQprepare / PQexecPrepared / PQexecParams, which speak the
    extended protocol (Parse, Bind, Describe, Execute, Sync).
    """
    lib = ctypes.CDLL(ctypes.util.find_library("pq") or "libpq.so.5")
    c_char_pp = ctypes.POINTER(ctypes.c_char_p)
    lib.PQconnectdb.restype = ctypes.c_void_p
    lib.PQconnectdb.argtypes = [ctypes.c_char_p]
    lib.PQstatus.argtypes = [ctypes.c_void_p]
    lib.PQerrorMessage.restype = ctypes.c_char_p
    lib.PQerrorMessage.argtypes = [ctypes.c_void_p]
    lib.PQprepare.restype = ctypes.c_void_p
    lib.PQprepare.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                              ctypes.c_int, ctypes.c_void_p]
    lib.PQexecPrepared.restype = ctypes.c_void_p
    lib.PQexecPrepared.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                   c_char_pp, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int]
    lib.PQexecParams.restype = ctypes.c_void_p
    lib.PQexecParams.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                 ctypes.c_void_p, c_char_pp, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_int]
    lib.PQresultStatus.argtypes = [ctypes.c_void_p]
    lib.PQresStatus.restype = ctypes.c_char_p
    lib.PQresStatus.argtypes = [ctypes.c_int]
    lib.PQntuples.argtypes = [ctypes.c_void_p]
    lib.PQresultErrorMessage.restype = ctypes.c_char_p
    lib.PQresultErrorMessage.argtypes = [ctypes.c_void_p]
    lib.PQclear.argtypes = [ctypes.c_void_p]
    lib.PQfinish.argtypes = [ctypes.c_void_p]

    def params(*vals):
        arr = (ctypes.c_char_p * len(vals))()
        for i, v in enumerate(vals):
            arr[i] = None if v is None else v.encode()
        return arr

    def show(what, res):
        st = lib.PQresultStatus(res)
        print(f"{what}: {lib.PQresStatus(st).decode()} rows={lib.PQntuples(res)} "
              f"{lib.PQresultErrorMessage(res).decode().strip()}", file=sys.stderr)
        lib.PQclear(res)

    conninfo = (f"host={HOST} port={port} user=postgres dbname=postgres "
                f"sslmode=disable gssencmode=disable application_name=faultbox")
    conn = lib.PQconnectdb(conninfo.encode())
    if lib.PQstatus(conn) != 0:
        raise SystemExit(lib.PQerrorMessage(conn).decode())

    # Named prepared statement, executed twice with different parameters.
    show("prepare", lib.PQprepare(
        conn, b"q", b"SELECT $1::int AS id, $2::text AS name, now() IS NOT NULL AS ok",
        2, None))
    show("exec 1", lib.PQexecPrepared(conn, b"q", 2, params("1", "a"), None, None, 0))
    show("exec 2", lib.PQexecPrepared(conn, b"q", 2, params("2", None), None, None, 0))
    # Unnamed statement with a multi-row result.
    show("params", lib.PQexecParams(
        conn, b"SELECT g, repeat('x', g) FROM generate_series(1, $1::int) g",
        1, None, params("3"), None, None, 0))
    # An error raised while executing (division by zero).
    show("error", lib.PQexecParams(
        conn, b"SELECT 1 / $1::int", 1, None, params("0"), None, None, 0))
    # And the connection still works afterwards.
    show("after", lib.PQexecParams(
        conn, b"SELECT $1::text", 1, None, params("still here"), None, None, 0))
    lib.PQfinish(conn)


def pg_pipeline(port):
    """libpq pipeline mode: several extended-protocol queries, one Sync.

    The second query fails, so the server skips the third (libpq reports
    it as PGRES_PIPELINE_ABORTED) until the Sync; a fourth query sent in a
    second batch works again.
    """
    lib = ctypes.CDLL(ctypes.util.find_library("pq") or "libpq.so.5")
    c_char_pp = ctypes.POINTER(ctypes.c_char_p)
    vp = ctypes.c_void_p
    for name, res, args in [
        ("PQconnectdb", vp, [ctypes.c_char_p]),
        ("PQstatus", ctypes.c_int, [vp]),
        ("PQerrorMessage", ctypes.c_char_p, [vp]),
        ("PQenterPipelineMode", ctypes.c_int, [vp]),
        ("PQexitPipelineMode", ctypes.c_int, [vp]),
        ("PQpipelineSync", ctypes.c_int, [vp]),
        ("PQsendQueryParams", ctypes.c_int,
         [vp, ctypes.c_char_p, ctypes.c_int, vp, c_char_pp, vp, vp, ctypes.c_int]),
        ("PQgetResult", vp, [vp]),
        ("PQresultStatus", ctypes.c_int, [vp]),
        ("PQresStatus", ctypes.c_char_p, [ctypes.c_int]),
        ("PQclear", None, [vp]),
        ("PQfinish", None, [vp]),
    ]:
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args

    def params(*vals):
        arr = (ctypes.c_char_p * len(vals))()
        for i, v in enumerate(vals):
            arr[i] = v.encode()
        return arr

    conninfo = (f"host={HOST} port={port} user=postgres dbname=postgres "
                f"sslmode=disable gssencmode=disable application_name=faultbox")
    conn = lib.PQconnectdb(conninfo.encode())
    if lib.PQstatus(conn) != 0:
        raise SystemExit(lib.PQerrorMessage(conn).decode())
    assert lib.PQenterPipelineMode(conn) == 1

    def send(sql, *vals):
        assert lib.PQsendQueryParams(conn, sql, len(vals), None, params(*vals),
                                     None, None, 0) == 1

    def drain(n_queries):
        # Each query yields its result(s) then NULL; the Sync yields
        # PGRES_PIPELINE_SYNC.
        for _ in range(n_queries):
            while True:
                res = lib.PQgetResult(conn)
                if not res:
                    break
                print("pipeline:", lib.PQresStatus(lib.PQresultStatus(res)).decode(),
                      file=sys.stderr)
                lib.PQclear(res)
        res = lib.PQgetResult(conn)
        print("pipeline:", lib.PQresStatus(lib.PQresultStatus(res)).decode(),
              file=sys.stderr)
        lib.PQclear(res)

    send(b"SELECT $1::int + 1", "41")
    send(b"SELECT 1 / $1::int", "0")          # fails: division by zero
    send(b"SELECT $1::text", "skipped")       # aborted, never executed
    assert lib.PQpipelineSync(conn) == 1
    drain(3)
    send(b"SELECT $1::text", "recovered")
    assert lib.PQpipelineSync(conn) == 1
    drain(1)
    assert lib.PQexitPipelineMode(conn) == 1
    lib.PQfinish(conn)


# --- tcp echo -------------------------------------------------------------------

class EchoHandler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:          # one line in, the same line out
            self.wfile.write(line)
            self.wfile.flush()


def echo_server(port):
    socketserver.TCPServer.allow_reuse_address = True
    with socketserver.TCPServer((HOST, port), EchoHandler) as srv:
        srv.serve_forever()


def echo_client(port):
    s = connect(port)
    for line in (b"hello\n", b"second line\n"):
        s.sendall(line)
        got = read_until(s, lambda b: b.endswith(b"\n"))
        assert got == line, got
    s.close()


# --- http -----------------------------------------------------------------------

class HttpHandler(http.server.BaseHTTPRequestHandler):
    """GET|HEAD /hello, GET /other, GET /chunked, POST /echo (plain or chunked).

    Anything else gets a 404 from send_error, which also closes the
    connection.
    """
    protocol_version = "HTTP/1.1"        # keep-alive by default

    def version_string(self):
        return "faultbox-fixture/1"              # the Server header

    def date_time_string(self, timestamp=None):
        return "Thu, 01 Jan 2026 00:00:00 GMT"   # fixed, so re-records diff cleanly

    def log_message(self, fmt, *args):
        print("http: " + fmt % args, file=sys.stderr)

    def send_body(self, body, ctype="text/plain"):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/hello":
            self.send_body(b"hello from faultbox\n")
        elif self.path == "/other":
            self.send_body(b'{"second": true}\n', "application/json")
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"first chunk\n", b"second, a bit longer chunk\n", b"x" * 300):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_error(404)

    def do_HEAD(self):
        # Headers of GET /hello, with Content-Length but no body.
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(b"hello from faultbox\n")))
        self.end_headers()

    def read_chunked(self):
        body = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass                 # skip trailers
                return body
            body += self.rfile.read(size)
            self.rfile.readline()        # CRLF after the chunk data

    def do_POST(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self.read_chunked()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_body(b"got %d bytes: " % len(body) + body)


def http_server(port):
    http.server.ThreadingHTTPServer.allow_reuse_address = True
    with http.server.ThreadingHTTPServer((HOST, port), HttpHandler) as srv:
        srv.serve_forever()


COMMANDS = {
    "redis-pipelined": redis_pipelined,
    "redis-big": redis_big,
    "memcached": memcached,
    "memcached-pipelined": memcached_pipelined,
    "pg-extended": pg_extended,
    "pg-pipeline": pg_pipeline,
    "echo-server": echo_server,
    "echo-client": echo_client,
    "http-server": http_server,
}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in COMMANDS:
        raise SystemExit(__doc__)
    COMMANDS[sys.argv[1]](int(sys.argv[2]))
