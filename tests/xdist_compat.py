"""pytest-xdist's private API, in one place: the scheduler that keeps the suite's modules in
the groups tests/conftest.py names.

`make test` runs two pytest workers (`-n 2 --dist loadscope`); `pytest_xdist_make_scheduler`
(public) gives them this scheduler. Every module of a group runs on one worker (its
module-scoped fixtures made once, a session fixture two modules share made once), and the
groups are the suite's two halves of about equal time, the biggest unit first.
"""
from xdist.scheduler import LoadScopeScheduling


class Groups(LoadScopeScheduling):
    """`--dist loadscope` with the scope of a test being its module's group."""

    def __init__(self, config, log, groups: dict[str, str]):
        super().__init__(config, log)
        self.groups = groups  # module name (test_x) -> group name

    # pytest-xdist 3.8.0 (tested with pytest 9.2.0): `_split_scope(nodeid)` names the unit of
    # work a test belongs to. Public stand-in: `--dist loadgroup` with `xdist_group` marks,
    # which pytest 9.2 breaks (xdist renames the items through `item._nodeid`, and pytest 9.2's
    # `nodeid` no longer reads it), so every test was scheduled on its own.
    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
        return self.groups.get(module, module)
