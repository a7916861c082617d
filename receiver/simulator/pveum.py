"""The ``pveum`` lines users paste, applied to the simulator's privilege model.

Only the subset the product's set-up needs (pve-access-control ``src/PVE/CLI/pveum.pm``
maps each to its API call, named below); anything else is an error, so a test cannot
think it applied a line that was ignored (a comment, ``--comment``, is kept nowhere).  Options take ``--name value`` or
``--name=value``; lists are separated by commas, semicolons or spaces
(PVE::Tools ``split_list``); booleans are 0/1, yes/no, true/false, on/off.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .roles import AccessError

if TYPE_CHECKING:
    from .userconfig import UserConfig

# command words -> (positional arguments, options it takes)
_COMMANDS = {
    ("user", "add"): (("userid",), ("groups", "comment")),  # API2/User.pm create_user
    ("user", "modify"): (("userid",), ("groups", "append")),  # API2/User.pm update_user
    ("user", "token", "add"): (("userid", "tokenid"), ("privsep",)),  # API2/User.pm generate_token
    ("group", "add"): (("groupid",), ()),  # API2/Group.pm create_group
    ("acl", "modify"): (("path",), ("users", "groups", "tokens", "roles", "propagate")),  # API2/ACL.pm update_acl
    ("acl", "delete"): (("path",), ("users", "groups", "tokens", "roles")),  # update_acl with delete
    ("pool", "add"): (("poolid",), ()),  # pve-manager API2/Pool.pm create_pool
    ("pool", "modify"): (("poolid",), ("vms",)),  # pve-manager API2/Pool.pm update_pool
}
_BOOLEANS = {"1": True, "yes": True, "true": True, "on": True, "0": False, "no": False, "false": False, "off": False}


def _split_list(value: str) -> list:
    return [item for item in re.split(r"[,;\s]+", value) if item]


def _boolean(name: str, value: str) -> bool:
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise AccessError(
            "400 Parameter verification failed. %s: type check ('boolean') failed - got '%s'" % (name, value)
        ) from None


def parse(command_line: str) -> tuple:
    """``pveum acl modify / --users u@pve --roles R`` -> (("acl", "modify"), {"path": "/", ...})."""
    try:
        words = shlex.split(command_line, comments=True)
    except ValueError as exc:
        raise AccessError("cannot split %r: %s" % (command_line, exc)) from None
    if words[:1] == ["pveum"]:
        words = words[1:]
    for command in sorted(_COMMANDS, key=len, reverse=True):
        if tuple(words[: len(command)]) == command:
            break
    else:
        raise AccessError("unknown or unsupported command: pveum %s" % " ".join(words))
    positional, options = _COMMANDS[command]
    args: dict = {}
    rest = words[len(command) :]
    while rest:
        word = rest.pop(0)
        if word.startswith("--"):
            name, sep, value = word[2:].partition("=")
            if name not in options:
                raise AccessError("pveum %s: unknown option '--%s'" % (" ".join(command), name))
            if not sep:
                if not rest:
                    raise AccessError("pveum %s: option '--%s' needs a value" % (" ".join(command), name))
                value = rest.pop(0)
            args[name] = value
        elif len([p for p in positional if p in args]) < len(positional):
            args[next(p for p in positional if p not in args)] = word
        else:
            raise AccessError("pveum %s: too many arguments ('%s')" % (" ".join(command), word))
    missing = [p for p in positional if p not in args]
    if missing:
        raise AccessError("pveum %s: missing argument <%s>" % (" ".join(command), missing[0]))
    return command, args


def apply(
    access: UserConfig, command_line: str, existing_vmids: Iterable[int], new_secret: Callable[[str], str]
) -> str:
    """Apply one ``pveum`` line; what pveum would print (a new token's secret), else ``""``.

    ``new_secret(tokenid)`` gives the secret of a token being added.
    """
    command, args = parse(command_line)
    with access.transaction():
        return _apply(access, command, args, existing_vmids, new_secret)


def _apply(
    access: UserConfig, command: tuple, args: dict, existing_vmids: Iterable[int], new_secret: Callable[[str], str]
) -> str:
    if command == ("user", "add"):
        access.add_user(args["userid"])
        if "groups" in args:
            access.set_user_groups(args["userid"], _split_list(args["groups"]), append=True)
    elif command == ("user", "modify"):
        if "groups" not in args:
            raise AccessError("pveum user modify: only --groups is supported here")
        append = _boolean("append", args["append"]) if "append" in args else False
        access.set_user_groups(args["userid"], _split_list(args["groups"]), append=append)
    elif command == ("user", "token", "add"):
        privsep = _boolean("privsep", args["privsep"]) if "privsep" in args else True
        tokenid = "%s!%s" % (args["userid"], args["tokenid"])
        secret = new_secret(tokenid)
        access.add_token(args["userid"], args["tokenid"], privsep, secret)
        return 'full-tokenid: %s\ninfo: {"privsep":%d}\nvalue: %s' % (tokenid, privsep, secret)
    elif command == ("group", "add"):
        access.add_group(args["groupid"])
    elif command in (("acl", "modify"), ("acl", "delete")):
        _acl(access, args, delete=command[1] == "delete")
    elif command == ("pool", "add"):
        access.add_pool(args["poolid"])
    elif command == ("pool", "modify"):
        if "vms" not in args:
            raise AccessError("pveum pool modify: only --vms is supported here")
        try:
            vmids = [int(v) for v in _split_list(args["vms"])]
        except ValueError:
            raise AccessError("400 Parameter verification failed. vms: invalid format") from None
        access.pool_add_vms(args["poolid"], vmids, existing_vmids)
    return ""


def _acl(access: UserConfig, args: dict, delete: bool) -> None:
    """API2/ACL.pm ``update_acl``: every role for every user, group and token named."""
    principals = [
        (kind, ugid)
        for option, kind in (("users", "user"), ("groups", "group"), ("tokens", "token"))
        for ugid in _split_list(args.get(option, ""))
    ]
    if not principals:
        raise AccessError(
            "400 Parameter verification failed. users/groups/tokens: either 'users', 'groups' or 'tokens' is required."
        )
    if "roles" not in args:
        raise AccessError("400 Parameter verification failed. roles: property is missing and it is not optional")
    propagate = _boolean("propagate", args["propagate"]) if "propagate" in args else True
    for role in _split_list(args["roles"]):
        for kind, ugid in principals:
            access.modify_acl(args["path"], kind, ugid, role, propagate=propagate, delete=delete)
