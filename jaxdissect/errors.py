"""The common base of jaxdissect's errors.

Every error the library raises on purpose says what is wrong and what to do,
so its message is the whole story: launchers print any :class:`JaxDissectError`
as one ``error: ...`` line instead of a traceback. Each concrete error also
derives from the built-in type that fits it (mostly ``ValueError``).
"""


class JaxDissectError(Exception):
    """Base of jaxdissect's explained errors (catch this to catch them all)."""
