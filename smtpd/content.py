"""Message content on its way into the cleanup stage: size and write errors.

smtpd's BDAT (RFC 3030) writes message content through a ContentSink, after the
Received header that the session writes first, so that a chunked message meets what a
DATA message meets in the session's read_content(): the same size accounting against
message_size_limit and the same writer, the cleanup stage (lib/cleanup.py), which does
everything about headers (header_size_limit, hopcount_limit, header_checks) however the
content is split.

    sink = ContentSink(writer, cfg)
    sink.write(data)        content with LF line ends, split anywhere (a chunk, a part)
    sink.too_big, sink.problem, sink.size

ERRORS
    The first OSError of the writer is kept in `problem`; nothing is written after it,
    nor after the content passed message_size_limit (`too_big`): the caller reads the
    client's content to its end and then answers (Session.end_of_message).

SEE ALSO
    smtpd/session.py (read_content, the DATA path; bdat_cmd), lib/cleanup.py.
"""

from __future__ import annotations


class ContentSink:
    """Content after the Received header, on its way to the cleanup stage."""

    def __init__(self, writer, cfg):
        self.writer = writer
        self.size_limit = cfg["message_size_limit"]
        self.size = 0
        self.too_big = False
        self.problem: OSError | None = None

    def write(self, data: bytes) -> None:
        """Content with LF line ends, in pieces of any size."""
        if not data:
            return
        self.size += len(data)
        if self.size_limit and self.size > self.size_limit:
            self.too_big = True
        elif self.problem is None:
            try:
                self.writer.write(data)
            except OSError as exc:
                self.problem = exc
