"""Readdirplus entries the kernel keeps no inode for.

pyfuse3 answers every readdir as a readdirplus (it never offers the plain one), so the kernel
makes an inode and a dentry for each entry it is given, and later sends a FORGET for each:
for a 1M-file walk that is most of the time `find -type f` spends. An entry whose size we do
not know yet goes out with zero timeouts, so that inode is never used before a lookup
anyway. The FUSE protocol has the answer: a readdirplus entry whose node id is 0 is "no
attributes for this entry" (fs/fuse/readdir.c, fuse_direntplus_link: "do nothing"); its
name, type and d_ino (st_ino) still reach getdents. pyfuse3's EntryAttributes sets the node
id and st_ino together, so the node id is cleared in the C struct it wraps: `fuse_entry_param`
starts with the node id, right after the object header. The layout is checked once at import;
where it differs (another pyfuse3 build), entries keep their node id - slower, never wrong.
"""
from __future__ import annotations

import ctypes

import pyfuse3

_NODEID_OFFSET = object.__basicsize__      # PyObject header; fuse_entry_param.ino comes first
# fuse_entry_param: ino, generation, then struct stat, whose st_ino follows st_dev (8 bytes)
_STAT_INO_OFFSET = _NODEID_OFFSET + 16 + 8


def _layout_holds() -> bool:
    probe = pyfuse3.EntryAttributes()
    probe.st_ino = 0x1122334455667788
    probe.generation = 0x0102030405060708
    base = id(probe) + _NODEID_OFFSET
    try:
        return (type(probe).__basicsize__ >= _STAT_INO_OFFSET + 8
                and ctypes.c_uint64.from_address(base).value == 0x1122334455667788
                and ctypes.c_uint64.from_address(base + 8).value == 0x0102030405060708
                and ctypes.c_uint64.from_address(id(probe) + _STAT_INO_OFFSET).value == 0x1122334455667788)
    finally:
        del probe


AVAILABLE = _layout_holds()


def unlinked_ino(attrs: pyfuse3.EntryAttributes) -> "ctypes.c_uint64 | None":
    """Make `attrs` an entry without a node id and return a view of its st_ino: set
    `view.value = inode` per entry (pyfuse3's st_ino setter would set the node id again). The
    caller keeps `attrs` alive while it uses the view. None when the layout is not the known
    one: then set `attrs.st_ino` (entries keep their node id)."""
    if not AVAILABLE:
        return None
    attrs.st_ino = 0
    return ctypes.c_uint64.from_address(id(attrs) + _STAT_INO_OFFSET)
