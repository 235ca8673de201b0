"""Local viewer accounts for small sites: a users file of scrypt-hashed passwords, and `medpipe viewer-users`.

    medpipe viewer-users add --file users.txt --user dr_lee --scope predict:brain_mri    # password from a prompt
    medpipe viewer-users list --file users.txt                                           # with lock state
    medpipe viewer-users unlock --file users.txt --user dr_lee      # after 20 failed sign-ins locked the account

One line per user, `name:scrypt$n$r$p$salt$hash:scope,scope` (salt and hash in base64). The file holds no secret
in clear and is written with mode 0600; sites with a JWT issuer or client certificates need no file at all.
Failed sign-ins and locks are kept beside it in USERS_FILE.lockout.json (0600; serving.viewer.signin), which the
running gateway reads at every sign-in: an unlock, a removal or a password change here takes effect at once (and
the last two end the user's open sessions).
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medpipe.errors import ConfigError
from medpipe.files import write_atomic

USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # ~30 ms and 16 MB per check: slow for guessing, quick for a sign-in
MIN_PASSWORD = 10


@dataclass(frozen=True)
class LocalUser:
    name: str
    password_hash: str
    scopes: frozenset[str]


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return "scrypt${}${}${}${}${}".format(SCRYPT_N, SCRYPT_R, SCRYPT_P, base64.b64encode(salt).decode(),
                                          base64.b64encode(digest).decode())


def check_password(password: str, password_hash: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = password_hash.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def read_users(path: str | Path) -> dict[str, LocalUser]:
    """name -> LocalUser; a malformed line is an error naming its line number (never its content)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"viewer users file {path} does not exist: create it with `medpipe viewer-users add`")
    users: dict[str, LocalUser] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(":", 2)  # scopes hold colons themselves (predict:brain_mri)
        if len(parts) != 3 or not USER_NAME.match(parts[0]) or not parts[1].startswith("scrypt$"):
            raise ConfigError(f"viewer users file {path}, line {number}: expected name:scrypt$...:scopes "
                              "(rewrite it with `medpipe viewer-users add`)")
        scopes = frozenset(scope for scope in parts[2].split(",") if scope)
        users[parts[0]] = LocalUser(parts[0], parts[1], scopes)
    return users


def write_users(path: str | Path, users: dict[str, LocalUser]) -> None:
    path = Path(path)
    text = "".join(f"{u.name}:{u.password_hash}:{','.join(sorted(u.scopes))}\n" for u in users.values())
    write_atomic(path, text, mode=0o600)


def authenticate(users: dict[str, LocalUser], name: str, password: str) -> LocalUser | None:
    """The user when the password matches; the same work is done for unknown names (no timing oracle)."""
    user = users.get(name)
    if user is None:
        check_password(password, hash_password("unknown-user-placeholder", salt=b"0" * 16))
        return None
    return user if check_password(password, user.password_hash) else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medpipe viewer-users",
                                     description="manage the viewer's local users file (scrypt-hashed passwords)")
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add or replace a user; the password is read from a prompt or stdin")
    add.add_argument("--file", required=True)
    add.add_argument("--user", required=True)
    add.add_argument("--scope", action="append", default=[],
                     help="e.g. predict:brain_mri or predict:* (repeatable; none = may sign in, may not predict)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    remove = sub.add_parser("remove", help="remove a user")
    remove.add_argument("--file", required=True)
    remove.add_argument("--user", required=True)
    listing = sub.add_parser("list", help="list user names and scopes, and which accounts are locked")
    listing.add_argument("--file", required=True)
    unlock = sub.add_parser("unlock", help="unlock an account locked by failed sign-ins (and end its back-off)")
    unlock.add_argument("--file", required=True)
    unlock.add_argument("--user", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.file)
    users = read_users(path) if path.exists() else {}
    from serving.viewer.signin import Lockout

    if args.action == "list":
        state = Lockout(path).status() if path.exists() else {}
        now = time.time()
        for user in users.values():
            locked = state.get(user.name, {}).get("locked_until", 0) > now
            print(f"{user.name}\t{','.join(sorted(user.scopes)) or '-'}{chr(9) + 'LOCKED' if locked else ''}")
        return 0
    if not USER_NAME.match(args.user):
        raise ConfigError("a user name is 1-64 letters, digits or _ . @ -")
    if args.action == "unlock":
        if args.user not in users:
            raise ConfigError(f"no user {args.user} in {path}; see `medpipe viewer-users list --file {path}`")
        was = Lockout(path).unlock(args.user)
        print(f"unlock: {args.user} in {path} ({'was locked or backing off' if was else 'was not locked'})")
        return 0
    if args.action == "remove":
        users.pop(args.user, None)
    else:
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("password: ")
        if len(password) < MIN_PASSWORD:
            raise ConfigError(f"the password must have at least {MIN_PASSWORD} characters")
        users[args.user] = LocalUser(args.user, hash_password(password), frozenset(args.scope))
    write_users(path, users)
    print(f"{args.action}: {args.user} in {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from medpipe.cli import module_main

    module_main(main)
