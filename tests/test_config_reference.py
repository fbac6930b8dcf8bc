"""docs/configuration.md is generated from the config dataclasses: it must be current and complete."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from meerkat_hf.federated.config_reference import field_help, render_reference
from meerkat_hf.federated.federation_config import FederationConfig
from meerkat_hf.trainer.arguments import MeerkatZOArguments

DOC = Path(__file__).parents[1] / "docs" / "configuration.md"


def test_the_configuration_reference_is_current():
    assert DOC.read_text(encoding="utf-8") == render_reference(), (
        "docs/configuration.md is stale: python -m meerkat_hf.federated.config_reference > docs/configuration.md")


def test_every_setting_has_help_and_appears_once():
    text = render_reference()
    sections = [FederationConfig] + [type(f.default_factory()) for f in dataclasses.fields(FederationConfig)
                                     if f.default_factory is not dataclasses.MISSING]
    for cls in sections:
        missing = [name for name, text_ in field_help(cls).items() if not text_ and not dataclasses.is_dataclass(
            getattr(cls(), name))]
        assert not missing, f"{cls.__name__} fields without help (a comment or metadata['help']): {missing}"
    for name in ("learning_rate", "zo_eps", "zo_num_perturbations", "zo_estimator"):  # one name, in both tables
        assert text.count(f"| `{name}` |") == 2
    assert "| `lr` |" not in text and "`lr` -> `learning_rate`" in text
    assert "| `dp_clip` |" in text and "| `dp.clip` |" in text
    own = {f.name for f in dataclasses.fields(MeerkatZOArguments)} - {f.name for f in dataclasses.fields(MeerkatZOArguments.__mro__[1])}
    assert all(f"| `{name}` |" in text for name in own)


def test_a_comment_above_a_field_is_its_help():
    @dataclasses.dataclass
    class Example:
        # first line
        # second line
        a: int = 1
        b: int = 2  # trailing
        c: int = dataclasses.field(default=3, metadata={"help": "from metadata"})
        d: int = 4

    assert field_help(Example) == {"a": "first line second line", "b": "trailing", "c": "from metadata", "d": ""}
