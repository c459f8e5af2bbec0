"""docs/models.md: prose around a generated third-party conformance table (write_generated keeps the prose)."""
from pathlib import Path

from gradreg_fast.testing import conformance

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def test_generated_section_replaced_and_prose_kept(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{conformance.GENERATED_BEGIN}\nold table\n{conformance.GENERATED_END}\nafter\n")
    conformance.write_generated(str(page), "| new | table |")
    assert page.read_text() == (f"intro\n{conformance.GENERATED_BEGIN}\n| new | table |\n"
                                f"{conformance.GENERATED_END}\nafter\n")
    other = tmp_path / "whole.md"
    conformance.write_generated(str(other), "| whole |")
    assert other.read_text() == "| whole |\n"


def test_models_page_has_the_generated_section():
    text = DOC.read_text()
    assert conformance.GENERATED_BEGIN in text and conformance.GENERATED_END in text
    assert "model_kwargs" in text and "FromEmbeddings" in text
