"""The README's example runs as written."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

README = Path(__file__).parent.parent / "README.md"


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = re.search(r"## Example\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None
    (tmp_path / "readme_example.py").write_text(code.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    example = importlib.import_module("readme_example")
    try:
        app = example.create_app()
        with app.app_context():
            example.db.create_all()
            example.wfs.session.add(example.Conversation(id=1, title="hi"))
            example.wfs.session.commit()
        response = app.test_client().get("/conversations/1")
        assert response.get_json() == {"title": "hi"}
        assert app.test_client().get("/conversations/2").status_code == 404  # not a 500
        with app.app_context():
            assert example.wfs.session.scalar(sa.text("SELECT count(*) FROM visit")) == 1
            example.db.engine.dispose()
    finally:
        sys.modules.pop("readme_example", None)
