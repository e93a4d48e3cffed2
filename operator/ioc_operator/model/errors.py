"""The one error type for a user's mistake in an IOC, naming the field at fault."""

from __future__ import annotations

from pydantic import ValidationError


class IOCValidationError(ValueError):
    """An IOC that cannot be rendered. `field` is a dotted path such as spec.network.mode."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    @classmethod
    def from_pydantic(cls, exc: ValidationError) -> IOCValidationError:
        """Fold pydantic's errors into one message; the first error names the field."""
        parts: list[tuple[str, str]] = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "spec"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            parts.append((loc, msg))
        error = cls(parts[0][0], parts[0][1])
        if len(parts) > 1:
            error.args = ("; ".join(f"{loc}: {msg}" for loc, msg in parts),)
        return error
