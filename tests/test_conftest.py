"""The suite's own guards (tests/conftest.py)."""

import pytest
from conftest import TEMP_BUDGET_BYTES, temporary_root_overflow


@pytest.mark.once("torch")
def test_temporary_root_over_budget_names_its_largest_folder(tmp_path):
    """Apparent sizes count (a sparse file takes no disk here), folders are summed whole,
    and the budget itself is allowed."""
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "config.json").write_bytes(b"{}" * 5)
    deep = tmp_path / "left_behind" / "checkpoint"
    deep.mkdir(parents=True)
    with open(deep / "model.safetensors", "wb") as f:
        f.truncate(TEMP_BUDGET_BYTES)
    message = temporary_root_overflow(tmp_path)
    assert message is not None
    assert f"holds {TEMP_BUDGET_BYTES / 2**30:.2f} GiB" in message
    left_behind = f"left_behind {TEMP_BUDGET_BYTES // 2**20} MiB"
    assert message.index(left_behind) < message.index("small 0 MiB")
    assert temporary_root_overflow(tmp_path, budget=TEMP_BUDGET_BYTES + 10) is None
    assert temporary_root_overflow(tmp_path, budget=TEMP_BUDGET_BYTES + 9) is not None
