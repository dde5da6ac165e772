"""``Choice``: the string-valued enum every configuration option is typed with."""

from __future__ import annotations

import enum
from typing import List


class Choice(str, enum.Enum):
    """A string option. Members compare, hash, print and format as their value; member names
    equal the values (how OmegaConf parses a string into the enum)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> List[str]:
        """The allowed strings, in declaration order."""
        return [m.value for m in cls]
