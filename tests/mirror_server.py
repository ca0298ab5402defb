"""A static mirror of the seeds' public data on loopback, laid out as `fetch --mirror` asks:
`<owner>/<repo>/<commit>/<path>`, with Range requests and two faults (a reply cut midway, wrong
bytes). Files are copied in from a local copy of the data root, row by registry row."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from raysweep.data.fetch import Source


class Mirror:
    """Serves files under `root`; logs (path, Range header) of every request."""

    def __init__(self, root: Path, copy: Path):
        self.root = root
        self.copy = copy  # a data root holding the files to serve
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None  # the next reply: close the connection after this many body bytes
        self.corrupt = False  # serve wrong bytes (of the right length)
        self.ignore_range = False  # answer a Range request with the whole file (200)
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                asked = self.headers.get("Range")
                mirror.requests.append((self.path, asked))
                file = mirror.root / self.path.lstrip("/")
                if not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                if mirror.corrupt:
                    data = bytes(b ^ 0x20 for b in data)
                start = 0
                if asked and not mirror.ignore_range:
                    start = int(asked.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mirror.cut_after is not None:  # promise the whole body, send a part, hang up
                    body, mirror.cut_after = body[:mirror.cut_after], None
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def add(self, source: Source) -> None:
        dest = self.root / source.repo / source.commit / source.upstream_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((self.copy / source.path).read_bytes())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
