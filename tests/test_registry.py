"""The generic Registry every extensible concept is built on (families, layouts, benchmarks, launchers)."""

from __future__ import annotations

import pytest

from registry import Registry


def test_registration_order_collisions_and_unknown_names() -> None:
    colours: Registry[tuple[str, str]] = Registry("colour", origin=lambda entry: entry[1])
    red, blue = ("#ff0000", "plugin_a"), ("#0000ff", "plugin_b")
    assert colours.register("red", red) is red
    colours.register("blue", blue)
    assert colours.register("red", ("#ff0000", "plugin_a")) == red  # an equal entry again: a no-op
    assert colours.names() == ("red", "blue") and colours.values() == (red, blue)
    with pytest.raises(ValueError, match="colour 'red' is already registered by plugin_a"):
        colours.register("red", ("#ee0000", "plugin_c"))
    assert colours.get("red") == red  # the refused entry did not replace the first
    with pytest.raises(ValueError, match="unknown colour 'green'; registered: red, blue"):
        colours.get("green")
    with pytest.raises(ValueError, match="unknown colour None"):
        colours.get(None)


def test_same_decides_what_counts_as_the_same_entry() -> None:
    """A class re-created by a module reload is not a collision; the newer object is kept."""
    classes: Registry[type] = Registry(
        "class", origin=lambda c: c.__module__, same=lambda a, b: a.__qualname__ == b.__qualname__
    )
    first = type("Model", (), {})
    second = type("Model", (), {})
    classes.register("model", first)
    classes.register("model", second)
    assert classes.get("model") is second
    with pytest.raises(ValueError, match="already registered"):
        classes.register("model", type("Other", (), {}))
