"""Write the intersphinx inventories the docs build with, offline.

Each lists only the objects the docs link to, at their place in the
project's real documentation, one ``name domain:role uri`` a line ("$" in a
uri stands for the name). To link to another object, add its line and run
``python docs/_inventories/make.py``. Where the network is reachable, each
project's real ``objects.inv`` can replace these files.
"""

import pathlib
import zlib

INVENTORIES = {
    "python": (
        "Python",
        "3",
        """
        None py:data library/constants.html#$
        ValueError py:exception library/exceptions.html#$
        bool py:class library/functions.html#$
        concurrent.futures.Executor py:class library/concurrent.futures.html#$
        concurrent.futures.Future py:class library/concurrent.futures.html#$
        dict py:class library/stdtypes.html#$
        int py:class library/functions.html#$
        list py:class library/stdtypes.html#$
        object py:class library/functions.html#$
        str py:class library/stdtypes.html#$
        threading.Thread py:class library/threading.html#$
        tuple py:class library/stdtypes.html#$
        typing.Any py:data library/typing.html#$
        typing.Callable py:data library/typing.html#$
        typing.ContextManager py:class library/typing.html#$
        typing.Literal py:data library/typing.html#$
        typing.Mapping py:class library/typing.html#$
        """,
    ),
    "flask": (
        "Flask",
        "stable",
        """
        flask.Flask py:class api/#$
        """,
    ),
    "sqlalchemy": (
        "SQLAlchemy",
        "2.0",
        """
        sqlalchemy.create_engine py:function core/engines.html#$
        sqlalchemy.engine.Engine py:class core/connections.html#$
        sqlalchemy.exc.TimeoutError py:exception core/exceptions.html#$
        sqlalchemy.orm.Session py:class orm/session_api.html#$
        sqlalchemy.orm.sessionmaker py:class orm/session_api.html#$
        """,
    ),
}

HEADER = """\
# Sphinx inventory version 2
# Project: {project}
# Version: {version}
# The remainder of this file is compressed using zlib.
"""


def main() -> None:
    here = pathlib.Path(__file__).parent
    for name, (project, version, objects) in INVENTORIES.items():
        lines = []
        for line in sorted(objects.split("\n")):
            if line.strip():
                obj, role, uri = line.split()
                lines.append(f"{obj} {role} 1 {uri} -\n")
        data = HEADER.format(project=project, version=version).encode()
        data += zlib.compress("".join(lines).encode(), 9)
        (here / f"{name}.inv").write_bytes(data)


if __name__ == "__main__":
    main()
