"""The README's config-fields tables: generated from the live schema, every field there with a meaning, and the
defaults they print are the config's own."""

from pathlib import Path

import pytest
import yaml

from cdm_dist.chains.config import ZetaConfig
from cdm_dist.driver import fields
from cdm_dist.driver.campaign import CampaignConfig, leaves, load_config
from cdm_dist.errors import InputError

README = Path(__file__).resolve().parents[3] / "README.md"
TABLES, ROWS = fields.walk()
DEFAULT = load_config(None, [])
SECTIONS = {t.name for t in TABLES if ": " not in t.name}  # the top level and its sections, not a union's kinds


def test_readme_holds_the_generated_tables():
    block = fields.block(README.read_text(encoding="utf-8"), "README.md")
    assert block == fields.markdown(), (
        "README.md's config-fields tables differ from the config schema (a field added, removed, its default, type "
        f"or # comment changed): run `{fields.REGENERATE}` and commit README.md"
    )


def test_every_field_has_a_meaning():
    missing = [row.path for row in ROWS if not row.meaning.strip()]
    assert not missing, f"fields without a meaning: {missing}; give each a trailing `# comment` on its line"


def test_every_field_of_the_default_config_is_listed():
    """Every leaf of the resolved default config (found by dumping it, not by the schema walk) has a row."""
    listed = {row.path for row in ROWS}
    paths = {".".join("[]" if p.isdigit() else p for p in path.split(".")) for path in leaves(DEFAULT.model_dump())}
    paths = {p.replace(".[]", "[]").removesuffix("[]") for p in paths}  # a list of numbers is one field
    assert paths <= listed, f"not in the table: {sorted(paths - listed)}"


def _value(path: str):
    """The default config's value at a dotted path, by attribute access; None where a section above it is unset."""
    node = DEFAULT
    for part in path.split("."):
        if node is None:
            return None
        node = getattr(node, part)
    return node


def _in_default(path: str) -> bool:
    """Whether every section above a path is set in the default config (e.g. chains.source is not)."""
    parts = path.split(".")
    return all(_value(".".join(parts[:i])) is not None for i in range(1, len(parts)))


PLAIN = [
    row
    for row in ROWS
    if row.table in SECTIONS
    and "[]" not in row.path
    and "{}" not in row.path
    and row.default is not fields.REQUIRED
    and _in_default(row.path)
]


@pytest.mark.parametrize(
    ("path", "value", "text"),
    [
        ("method.n_c", DEFAULT.method.n_c, "`250`"),
        ("method.eval_samples", DEFAULT.method.eval_samples, "`null`"),
        ("chains.count", DEFAULT.chains.count, "`8`"),
        ("resources.num_cpus", DEFAULT.resources.num_cpus, "`1.0`"),
        ("tracking.flush_seconds", DEFAULT.tracking.flush_seconds, "`5.0`"),
        ("tune.milestones", DEFAULT.tune.milestones, "`[0.25, 0.5, 0.75]`"),
        ("chains.zeta[].final", ZetaConfig().final, "`1.0`"),
        ("chains.zeta[].kind", ZetaConfig().kind, "`constant`"),
    ],
)
def test_defaults_of_nested_paths(path, value, text):
    row = next(r for r in ROWS if r.path == path)
    assert row.default == value
    assert row.default_text == text


@pytest.mark.parametrize("row", PLAIN, ids=lambda row: row.path)
def test_a_field_set_to_its_printed_default_changes_nothing(row):
    """For every field of the default config outside lists, mappings and union kinds: `--set path=<the table's
    default>` gives the default config, and the row's default is what attribute access on it finds (but
    problem.name: a config that names no problem gets gmm2d)."""
    text = row.default_text.removeprefix("`").removesuffix("`")
    assert load_config(None, [f"{row.path}={text}"]) == DEFAULT
    if row.path != "problem.name":
        assert _value(row.path) == row.default


def test_zeta_final_reads_as_a_ratio():
    meaning = next(r.meaning for r in ROWS if r.path == "chains.zeta[].final")
    assert "ratio" in meaning and "ζ_end / ζ_start" in meaning


def test_a_union_has_a_table_per_kind_and_a_repeat_refers_back():
    names = {t.name for t in TABLES}
    assert {"problem.sampler: flow", "problem.sampler: generator", "problem.sampler: factory"} <= names
    assert {"method.loss: mmd", "method.loss: energy"} <= names
    assert not any(n.startswith("problem.full_sampler:") for n in names)
    assert "as `problem.sampler`" in next(r.type for r in ROWS if r.path == "problem.full_sampler")


def test_write_replaces_only_the_block(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{fields.START}\nold\n{fields.END}\n\nafter\n", encoding="utf-8")
    assert fields.main(["--write", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == f"# Title\n\nbefore\n\n{fields.markdown()}\n\nafter\n"
    assert fields.write(readme) is False  # a second write has nothing to change
    assert fields.main([]) == 0
    assert capsys.readouterr().out.startswith(f"{readme}: config fields rewritten\n{fields.START}")
    with pytest.raises(InputError, match="no <!-- config-fields:start -->"):
        fields.block("no markers here")


def test_a_new_field_without_a_comment_has_no_meaning():
    """A field added without a `# comment` shows up with an empty meaning (which the test above refuses)."""

    class Extra(CampaignConfig):
        undocumented: int = 3

    row = next(r for r in fields.rows(Extra) if r.path == "undocumented")
    assert (row.type, row.default_text, row.meaning) == ("int", "`3`", "")
    assert yaml.safe_load(row.default_text.strip("`")) == 3
