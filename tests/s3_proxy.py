"""A real HTTP proxy on 127.0.0.1 in front of the suite's S3 server (moto), for the stores
the server itself does not imitate: one that throttles (503 SlowDown), one that ignores
conditional writes. Every request is forwarded as it came (its signature untouched: moto
does not check it), unless `rule` answers it first."""
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (503, b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b'<Message>Please reduce your request rate.</Message></Error>')
HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect",
       "content-length"}  # set again for what is sent


class S3Proxy:
    """`rule(method, path, headers)` returns None (forward) or (status, body) to answer with;
    `drop` names request headers removed before forwarding (e.g. If-None-Match). `log` holds
    (method, path, status) of every request."""

    def __init__(self, target: str, rule=None, drop=()):
        self.target = urlsplit(target)
        self.rule, self.drop = rule or (lambda method, path, headers: None), {h.lower() for h in drop}
        self.log: list[tuple[str, str, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # each reply is two writes (headers, then body): with Nagle's algorithm on, the body
            # waited for the client's delayed ACK, 40 ms a request on loopback
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                """The body as it came: a chunked one with its framing (the S3 client's
                aws-chunked uploads go through untouched), trailers included."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = []
                while True:
                    line = self.rfile.readline()
                    raw.append(line)
                    size = int(line.split(b";")[0], 16)
                    if size == 0:
                        while True:  # trailers, then the empty line
                            line = self.rfile.readline()
                            raw.append(line)
                            if line in (b"\r\n", b"\n", b""):
                                return b"".join(raw)
                    raw.append(self.rfile.read(size + 2))

            def _any(self):
                body = self._body()
                answer = proxy.rule(self.command, self.path, self.headers)
                if answer is None:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP | proxy.drop}
                    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                        headers["Transfer-Encoding"] = "chunked"  # the framing is in `body` already
                    elif body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    upstream = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                    try:
                        upstream.request(self.command, self.path, body=body, headers=headers)
                        response = upstream.getresponse()
                        status, data = response.status, response.read()
                        reply = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP]
                        length = response.getheader("Content-Length") if self.command == "HEAD" else None
                    finally:
                        upstream.close()
                else:
                    (status, data), reply, length = answer, [("Content-Type", "application/xml")], None
                proxy.log.append((self.command, self.path, status))
                self.send_response(status)
                for k, v in reply:
                    self.send_header(k, v)
                self.send_header("Content-Length", length or str(len(data)))  # a HEAD's: the object's
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
