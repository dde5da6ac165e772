"""``Choice``: the string-valued enum every configuration option is typed with."""

from __future__ import annotations

from typing import List

from ..curvature.options import StrOption


class Choice(StrOption):
    """A configuration option: a :class:`~marglik.curvature.options.StrOption` whose member names
    equal the values (how OmegaConf parses a string into the enum); it also formats as its value."""

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> List[str]:
        """The allowed strings, in declaration order."""
        return [m.value for m in cls]
