"""Atomic writes leave files with the permissions of a plain open(), not mkstemp's 0600."""

import os
import stat
import tempfile

from smar.atomic import publish


def test_published_file_has_ordinary_permissions(tmp_path):
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o600
    old = os.umask(0o022)
    try:
        publish(tmp, tmp_path / "out.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out.json").st_mode) == 0o644
    assert not os.path.exists(tmp)
