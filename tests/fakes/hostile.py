"""Answers a misbehaving provider might give."""

TRUNCATED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<response>\n  <code>1</code>\n  <messageList>\n  <me'
)
GARBAGE = b"\x00\xffthis is not xml at all \xfe"
XXE = (
    b'<?xml version="1.0"?>\n<!DOCTYPE response [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
    b"<response><code>1</code><balance>&xxe;</balance></response>"
)


def _billion_laughs() -> bytes:
    entities = ['<!ENTITY lol0 "lol">']
    for level in range(1, 10):
        entities.append(f'<!ENTITY lol{level} "{f"&lol{level - 1};" * 10}">')
    doctype = "<!DOCTYPE response [" + "".join(entities) + "]>"
    body = "<response><code>1</code><balance>&lol9;</balance></response>"
    return f'<?xml version="1.0"?>{doctype}{body}'.encode()


BILLION_LAUGHS = _billion_laughs()
