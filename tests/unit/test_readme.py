"""The README's configuration reference is the one the pydantic models generate."""

from __future__ import annotations

from resilgate.config_doc import BEGIN, END, SECTIONS, reference_markdown
from tests.conftest import REPO


def test_readme_reference_matches_models() -> None:
    readme = (REPO / "README.md").read_text()
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    assert readme[start:end] == reference_markdown(), (
        "README config reference is stale: run `python -m resilgate.config_doc`"
    )


def test_every_field_is_documented() -> None:
    readme = (REPO / "README.md").read_text()
    for _, model in SECTIONS:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert f"| `{name}` |" in readme, f"{model.__name__}.{name} missing from README"


def test_every_config_model_has_a_section() -> None:
    import inspect

    from pydantic import BaseModel

    from resilgate import config

    models = {
        obj
        for _, obj in inspect.getmembers(config, inspect.isclass)
        if issubclass(obj, BaseModel)
        and obj.__module__ == config.__name__
        and obj.__name__[0] != "_"
    }
    assert models == {model for _, model in SECTIONS}
