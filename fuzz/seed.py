#!/usr/bin/env python3
"""Seeds fuzz/corpus/<target>/ from the project's own cases: h1/tests/requests.cases
(request heads, request streams, chunked bodies), a few backend responses, and the
example policies. Run once after adding cases; libFuzzer grows the corpus from
here, and scripts/fuzz --merge keeps the checked-in corpus minimal."""
import hashlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def unescape(line):
    out = bytearray()
    i = 0
    while i < len(line):
        c = line[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        n = line[i + 1]
        if n == "x":
            out.append(int(line[i + 2:i + 4], 16))
            i += 4
            continue
        out += {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}[n]
        i += 2
    return bytes(out)


def cases():
    name, data = None, bytearray()
    for line in (ROOT / "h1" / "tests" / "requests.cases").read_text().splitlines():
        if line.startswith("=== "):
            if name:
                yield name, bytes(data)
            name, data = line[4:].strip(), bytearray()
        elif line.startswith("> "):
            data += unescape(line[2:])
    if name:
        yield name, bytes(data)


def put(target, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()).write_bytes(data)


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive, X-P\r\nX-P: 1\r\nKeep-Alive: 5\r\n\r\n",
    b"HTTP/1.1 204 No Content\nA: 1\n\n",
    b"\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
]

for name, data in cases():
    put("h1_request_head", data)
    put("h1_request_stream", b"\x1f" + data)
    put("h1_request_stream", b"\x02" + data)
    m = re.search(rb"\r\n\r\n", data)
    if m and re.search(rb"(?i)transfer-encoding", data[: m.end()]):
        put("h1_chunked", b"\x03" + data[m.end():])
for r in RESPONSES:
    put("h1_response_head", r)
for p in sorted((ROOT / "policies").glob("*.yaml")):
    put("policy_load", p.read_bytes())
