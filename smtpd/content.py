"""Message content on its way into the queue file: header handling, size, write errors.

smtpd's BDAT (RFC 3030) writes message content through a ContentSink, after the Received
header that the session writes first, so that a chunked message gets what a DATA message
gets from the session's read_content(): the same header rules (as Postfix's cleanup), the
same size accounting against message_size_limit, the same queue file writer.

    sink = ContentSink(writer, cfg)
    sink.write(data)        content with LF line ends, split anywhere (a chunk, a part)
    sink.close()            the end of the content: a last line without LF goes out
    sink.too_big, sink.hops, sink.msgid, sink.problem, sink.size

HEADERS
    Lines up to the first empty line are headers. As Postfix's cleanup (mime_state.c), a
    header keeps its continuation lines and the rest of an over-long line only while it
    is shorter than header_size_limit: the excess is dropped, the mail accepted. Received:
    headers are counted (hopcount_limit is the caller's), the first Message-ID is kept for
    the log. A header line is looked at whole (up to line_length_limit bytes, as a DATA
    line), however the client split it over chunks.

ERRORS
    The first OSError of the writer is kept in `problem`; nothing is written after it,
    nor after the content passed message_size_limit (`too_big`): the caller reads the
    client's content to its end and then answers.

SEE ALSO
    smtpd/session.py (read_content, the DATA path; bdat_cmd), lib/queue.py (QueueWriter).
"""

from __future__ import annotations


class ContentSink:
    """Content after the Received header, on its way to a queue file writer."""

    def __init__(self, writer, cfg):
        self.writer = writer
        self.header_limit = cfg["header_size_limit"]
        self.size_limit = cfg["message_size_limit"]
        self.line_limit = cfg["line_length_limit"]
        self.in_header = True
        self.at_start = True            # the next byte begins a line
        self.header_len = 0
        self.partial = b""              # a header line not yet whole
        self.hops = 0
        self.msgid: str | None = None
        self.size = 0
        self.too_big = False
        self.problem: OSError | None = None

    def write(self, data: bytes) -> None:
        """Content with LF line ends, in pieces of any size."""
        if self.in_header:
            data = self._headers(self.partial + data)
        if data:
            self._emit(data)

    def close(self) -> None:
        """The end of the content: a header line without its LF goes out as it is."""
        if self.partial:
            piece, self.partial = self.partial, b""
            self._header_line(piece, False)

    def _emit(self, data: bytes) -> None:
        self.size += len(data)
        if self.size_limit and self.size > self.size_limit:
            self.too_big = True
        elif self.problem is None:
            try:
                self.writer.write(data)
            except OSError as exc:
                self.problem = exc

    def _headers(self, data: bytes) -> bytes:
        """Take header lines from data; the body that follows them is returned."""
        pos = 0
        self.partial = b""
        while self.in_header and pos < len(data):
            nl = data.find(b"\n", pos, pos + self.line_limit)
            if nl < 0:
                if len(data) - pos < self.line_limit:
                    self.partial = data[pos:]       # wait for the rest of the line
                    return b""
                piece, term = data[pos:pos + self.line_limit], False
                pos += self.line_limit
            else:
                piece, term = data[pos:nl], True
                pos = nl + 1
            self._header_line(piece, term)
        return data[pos:]

    def _header_line(self, body: bytes, term: bool) -> None:
        """One header line (or line_length_limit bytes of a longer one), as read_content."""
        data = body + b"\n" if term else body
        if self.at_start and term and not body:
            self.in_header = False                  # the empty line: the body follows
        elif self.at_start and body[:1] not in (b" ", b"\t"):
            self.header_len = len(body)             # a new header
            low = body[:12].lower()
            if low.startswith(b"received:"):
                self.hops += 1
            elif low.startswith(b"message-id:") and self.msgid is None:
                self.msgid = body[11:].strip().decode("latin-1")
        elif self.header_len < self.header_limit:
            self.header_len += len(body) + self.at_start
        else:
            data = b"\n" if term and not self.at_start else b""
        self.at_start = term
        if data:
            self._emit(data)
