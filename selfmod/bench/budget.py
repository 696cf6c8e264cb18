"""What one benchmark invocation runs: the options every benchmark shares and the one way they
are read from ``--set key=value``. Each benchmark's ``Budget`` subclasses :class:`BenchBudget`
with its own fields; the defaults are the published tables'."""

from __future__ import annotations

from typing import Annotated, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from selfmod.validation import check_out_dir, load_values, validate


class BenchBudget(BaseModel):
    """The fields every benchmark has: the published seeds and the results folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: the allowed values in words, for fields whose type says too little (lists); a subclass
    #: extends it with its own
    described: ClassVar[dict[str, str]] = {
        "seeds": "a list of 1 to 100 integers in [0, 2147483647]",
    }

    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4], min_length=1, max_length=100
    )
    out: str = Field("benchmarks/results", min_length=1, description="folder for the results")

    @field_validator("out")
    @classmethod
    def _out(cls, value: str) -> str:
        return check_out_dir(value)

    @classmethod
    def load(cls, overrides: list[str] | None = None) -> Self:
        """A budget from ``key=value`` overrides; bad input is one ``ConfigError`` line."""
        return validate(cls, load_values(None, overrides), cls.described)
