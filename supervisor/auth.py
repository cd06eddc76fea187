"""Who is on the other end of the client socket (SO_PEERCRED), and may they act for a tenant."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from jailer.profile import Profile


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]  # primary + supplementary gids

    @property
    def name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)


def peer_of(sock: socket.socket) -> Peer:
    """The kernel's word on the peer's identity at connect time (cannot be forged by the client)."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    groups = {gid}
    try:
        groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        pass  # no passwd entry: only the primary gid counts
    return Peer(pid, uid, gid, frozenset(groups))


def resolve_gid(group: int | str) -> int | None:
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def is_admin(peer: Peer, admin_group: str) -> bool:
    if peer.uid == 0:
        return True
    gid = resolve_gid(admin_group) if admin_group else None
    return gid is not None and gid in peer.groups


def may_act_for(peer: Peer, profile: Profile, admin_group: str = "") -> bool:
    if is_admin(peer, admin_group):
        return True
    if peer.uid in profile.access.uids:
        return True
    gids = {resolve_gid(g) for g in profile.access.groups} - {None}
    return bool(gids & peer.groups)
