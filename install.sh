#!/usr/bin/env bash
# pve-janitor installer.
#
#   ./install.sh receiver [--prefix DIR] [--extras LIST]
#       venv + package, /etc/pve-janitor/janitor.env, systemd unit, service user.
#   ./install.sh node --url URL (--secret SECRET | --secret-file FILE) [--attach all|VMID...] [--chain] [--force-attach]
#       on a Proxmox VE node: the hookscript, /etc/pve-janitor/hook.conf, the
#       `snippets` content type on storage `local`, and the hookscript on guests.
#
# Common options: --dry-run (print what would be done, prefixed DRY-RUN:),
# --root DIR (install under DIR instead of /; skips the root check; for tests).
# Every mode is idempotent. Exit codes: 0 ok, 1 failure, 2 usage or bad input.
# See docs/install-script.md.
set -eEuo pipefail
# set -e stops at the first unexpected failure; say where instead of stopping silently.
trap 'printf "%s: error: unexpected failure (exit %s) at line %s: %s\n" "$PROG" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR
umask 022 # the venv must be readable by the service user, whatever root's umask is

PROG=install.sh
SERVICE=pve-janitor
SERVICE_USER=pve-janitor
HOOK_NAME=pve-janitor-hook
HOOK_VOLUME="local:snippets/$HOOK_NAME"
SNIPPETS_DIR=/var/lib/vz/snippets
CONF_DIR=/etc/pve-janitor
ENV_FILE=$CONF_DIR/janitor.env
HOOK_CONF=$CONF_DIR/hook.conf
# /var/lib/pve-janitor is root's: a node's hookscript (root) spools under it. The
# receiver's service user owns only its own subdirectory, so on a host that runs
# both it owns nothing on the spool's path (docs/install-script.md, "State directories").
STATE_DIR=/var/lib/pve-janitor
RECEIVER_STATE_DIR=$STATE_DIR/receiver
UNIT_FILE=/etc/systemd/system/$SERVICE.service
DEFAULT_PREFIX=/opt/pve-janitor
DEFAULT_SPOOL_DIR=/var/lib/pve-janitor/spool
DEFAULT_TIMEOUT=2
MIN_SECRET_LENGTH=16
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# Set by find_source: where the product comes from (checkout or package), the
# package's data directory (the unit template) and the hookscript to install.
SOURCE="" DATA_DIR="" HOOK_SOURCE=""

usage() {
    cat <<EOF
Usage:
  $PROG receiver [--prefix DIR] [--extras LIST] [--dry-run] [--root DIR]
  $PROG node --url URL (--secret SECRET | --secret-file FILE)
             [--attach all|VMID...] [--chain] [--force-attach] [--dry-run] [--root DIR]

receiver  install the receiver: a venv in PREFIX/venv (default $DEFAULT_PREFIX) with
          pve-janitor from this checkout, $ENV_FILE (secrets generated
          once, kept on re-runs), the user $SERVICE_USER and $UNIT_FILE,
          enabled and started when systemd runs.
node      on a Proxmox VE node, as root: copy the hookscript to
          $SNIPPETS_DIR/$HOOK_NAME, write $HOOK_CONF, let storage
          'local' hold snippets, and attach the hookscript to guests.

Options:
  --prefix DIR         receiver: install directory (default $DEFAULT_PREFIX)
  --extras LIST        receiver: package extras to install, e.g. postgres or postgres,mysql
  --url URL            node: receiver base URL, http(s)://host[:port][/prefix]
  --secret SECRET      node: the receiver's CLEANUP_HOOK_SECRET (at least $MIN_SECRET_LENGTH characters)
  --secret-file FILE   node: read the secret from the first line of FILE (keeps it out of ps)
  --attach all|VMID... node: attach the hookscript to every guest on this node, or to these VMIDs
  --chain              node: for a guest that already has another hookscript, record that
                       script as CHAIN in hook.conf (it keeps running first) and attach ours
  --force-attach       node: attach even though other cluster nodes lack the hookscript
                       (a guest migrated to one of them would not start there)
  --dry-run            print each command and file write (DRY-RUN: ...) instead of doing it
  --root DIR           install under DIR instead of / (skips the root check)
  -h, --help           this text

Environment: PVE_JANITOR_PYTHON (python used to create the venv, default python3),
PVE_JANITOR_PIP_ARGS (extra pip arguments, e.g. "--no-index --find-links /srv/wheels"),
PVE_JANITOR_ASSUME_SYSTEMD (1: treat systemd as running; 0: never call systemctl),
PVE_JANITOR_NODE (node mode: this node's name, default the short host name).
Exit codes: 0 ok, 1 failure, 2 usage or bad input.
EOF
}

# --- output -----------------------------------------------------------------------

say() { printf '%s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    printf "Run '%s --help' for usage.\n" "$PROG" >&2
    exit 2
}

# A command as a user would type it; credentials in URLs (pip index) are hidden.
show_cmd() {
    local arg out=""
    for arg in "$@"; do
        if [[ -z $arg || $arg =~ [^A-Za-z0-9_./:,=@%+-] ]]; then
            arg="'${arg//\'/\'\\\'\'}'"
        fi
        out+="$arg "
    done
    printf '%s' "${out% }" | sed -E 's#(://)[^/@[:space:]]+@#\1***@#g'
}

# Run a command that changes state, or only print it in dry-run mode.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        say "DRY-RUN: $(show_cmd "$@")"
        return 0
    fi
    say "  + $(show_cmd "$@")"
    "$@"
}

# --- files ------------------------------------------------------------------------

# ensure_dir DIR MODE [OWNER]: create DIR when missing (an existing one is left as it is).
ensure_dir() {
    local dir=$1 mode=$2 owner=${3:-}
    [ -d "$dir" ] && return 0
    if [ "$DRY_RUN" = 1 ]; then
        say "DRY-RUN: mkdir -p -m $mode $dir${owner:+ (owner $owner)}"
        return 0
    fi
    mkdir -p "$dir"
    chmod "$mode" "$dir"
    if [ -n "$owner" ]; then chown "$owner" "$dir"; fi
}

# ensure_mode_owner PATH MODE [OWNER]: chmod / chown only when they differ.
ensure_mode_owner() {
    local path=$1 mode=$2 owner=${3:-}
    if [ "$(stat -c %a "$path")" != "${mode#0}" ]; then
        run chmod "$mode" "$path"
    fi
    if [ -n "$owner" ] && [ "$(stat -c %u:%g "$path")" != "$(numeric_owner "$owner")" ]; then
        run chown "$owner" "$path"
    fi
}

# write_file PATH MODE [OWNER]: write $CONTENT atomically (temp file + rename, so a
# reader never sees half a file); sets WROTE=1 when the content changed.
WROTE=0
CONTENT=
write_file() {
    local path=$1 mode=$2 owner=${3:-} tmp
    WROTE=0
    if [ -f "$path" ] && cmp -s "$path" <(printf '%s' "$CONTENT"); then
        ensure_mode_owner "$path" "$mode" "$owner"
        return 0
    fi
    WROTE=1
    if [ "$DRY_RUN" = 1 ]; then
        say "DRY-RUN: write $path (mode $mode${owner:+, owner $owner})"
        return 0
    fi
    tmp=$(mktemp "$(dirname "$path")/.$(basename "$path").XXXXXX") # mode 0600 from the start
    if ! { printf '%s' "$CONTENT" >"$tmp" && chmod "$mode" "$tmp"; } ||
        { [ -n "$owner" ] && ! chown "$owner" "$tmp"; } ||
        ! mv -f "$tmp" "$path"; then
        rm -f "$tmp"
        die "cannot write $path"
    fi
}

# --- KEY=value files (hook.conf, janitor.env) -------------------------------------

# The key of a KEY=value line (upper-cased, "export " tolerated), or nothing.
line_key() {
    if [[ $1 =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*= ]]; then
        printf '%s' "${BASH_REMATCH[2]^^}"
    fi
}

# conf_get FILE KEY: the value of KEY (the last one wins, quotes removed), or nothing.
conf_get() {
    local file=$1 want=$2 line value found=""
    [ -f "$file" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        [ "$(line_key "$line")" = "$want" ] || continue
        value=${line#*=}
        value=${value#"${value%%[![:space:]]*}"}
        value=${value%"${value##*[![:space:]]}"}
        if [ "${#value}" -ge 2 ] && [ "${value:0:1}" = "${value: -1}" ] && [[ ${value:0:1} == [\"\'] ]]; then
            value=${value:1:${#value}-2}
        fi
        found=$value
    done <"$file"
    printf '%s' "$found"
}

conf_has() {
    local line
    [ -f "$1" ] || return 1
    while IFS= read -r line || [ -n "$line" ]; do
        [ "$(line_key "$line")" = "$2" ] && return 0
    done <"$1"
    return 1
}

# --- users ------------------------------------------------------------------------

user_entry() { # the passwd line of the service user, or nothing
    if [ -n "$ROOT" ]; then
        [ -f "$ROOT/etc/passwd" ] || return 0
        awk -F: -v u="$SERVICE_USER" '$1 == u { print; exit }' "$ROOT/etc/passwd"
    else
        getent passwd "$SERVICE_USER" || true
    fi
}

# The owner to give the service's files: uid:gid under --root (names would resolve
# against this host), user:group otherwise; nothing when the user does not exist.
service_owner() {
    local entry
    entry=$(user_entry)
    [ -n "$entry" ] || return 0
    if [ -n "$ROOT" ]; then
        printf '%s' "$entry" | awk -F: '{ printf "%s:%s", $3, $4 }'
    else
        printf '%s:%s' "$SERVICE_USER" "$(id -gn "$SERVICE_USER")"
    fi
}

numeric_owner() { # user:group -> uid:gid (already numeric under --root); ? when unknown
    local user=${1%%:*} group=${1#*:} uid gid
    if [[ $user =~ ^[0-9]+$ ]]; then
        printf '%s' "$1"
        return 0
    fi
    uid=$(id -u "$user" 2>/dev/null) || uid="?"
    gid=$(getent group "$group" 2>/dev/null | cut -d: -f3) || gid="?"
    printf '%s:%s' "$uid" "${gid:-?}"
}

# --- checks -----------------------------------------------------------------------

require_root() {
    [ -n "$ROOT" ] && return 0
    if [ "$(id -u)" != 0 ]; then
        die "$PROG $MODE must run as root (it writes under /etc and ${1}); try: sudo $0 $MODE ..."
    fi
}

validate_url() {
    local url=$1 port re
    re='^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)(:([0-9]{1,5}))?(/[A-Za-z0-9._~/-]*)?$'
    if ! [[ $url =~ $re ]]; then
        usage_error "--url '$url' is not a receiver URL: expected http(s)://host[:port], e.g. http://10.0.0.5:8765 (no credentials, query or spaces)"
    fi
    port=${BASH_REMATCH[4]}
    if [ -n "$port" ] && { [ "$((10#$port))" -lt 1 ] || [ "$((10#$port))" -gt 65535 ]; }; then
        usage_error "--url '$url' has a port outside 1-65535"
    fi
}

# The characters a secret may hold: the same bytes whether systemd reads janitor.env
# (EnvironmentFile: quotes, backslashes, trailing spaces), a shell sources it
# ('. janitor.env': $, `, #, spaces, quotes) or the hookscript reads hook.conf
# (quotes, spaces at the ends). Anything else could leave the two ends disagreeing
# about the secret, and every event would be refused with 401.
SECRET_CHARS='A-Za-z0-9._~+/=-'
secret_is_plain() {
    local LC_ALL=C # ranges mean ASCII only, whatever the locale
    [[ $1 =~ ^[$SECRET_CHARS]+$ ]]
}

validate_secret() {
    local secret=$1
    [ -n "$secret" ] || usage_error "the secret is empty: give the receiver's CLEANUP_HOOK_SECRET"
    if [ "${#secret}" -lt "$MIN_SECRET_LENGTH" ]; then
        usage_error "the secret is too short (${#secret} characters, at least $MIN_SECRET_LENGTH): use the receiver's CLEANUP_HOOK_SECRET"
    fi
    if ! secret_is_plain "$secret"; then
        usage_error "the secret may hold only letters, digits and . _ ~ + / = - (no spaces, quotes, \$, #, backslashes, non-ASCII or control characters: systemd's EnvironmentFile, the shell and the hookscript would each read those differently); use the receiver's generated CLEANUP_HOOK_SECRET"
    fi
}

# --- state directories -------------------------------------------------------------

# Who "root" is for the files written: uid 0, or under --root the user running this
# (files there are created by it, and a test cannot chown to 0).
root_uid() { if [ -n "$ROOT" ]; then id -u; else echo 0; fi; }
root_owner() { if [ -n "$ROOT" ]; then printf '%s:%s' "$(id -u)" "$(id -g)"; else echo 0:0; fi; }

# $STATE_DIR root's (0755), $RECEIVER_STATE_DIR the service user's (0750). An
# earlier install.sh gave all of $STATE_DIR to the service user, which on a host
# that is also a Proxmox node let it replace the hookscript's spool: the directory
# is given back to root, unless it still holds the receiver's files (say a SQLite
# database), which the service must keep writing: then it stays as it is, the unit
# keeps it writable (LEGACY_STATE=1), and a warning says how to move them.
LEGACY_STATE=0
setup_state_dirs() {
    local owner=$1 dir="$ROOT$STATE_DIR" entries
    if [ -d "$dir" ] && [ ! -L "$dir" ]; then
        entries=$(find "$dir" -mindepth 1 -maxdepth 1 ! -name receiver ! -name spool -printf '%f ' 2>/dev/null || true)
        if [ -n "$entries" ]; then
            LEGACY_STATE=1
            warn "$STATE_DIR holds ${entries% } from an earlier install.sh, so it stays as it is, writable by $SERVICE_USER. On a host that is also a Proxmox node, that user could then replace the hookscript's spool $DEFAULT_SPOOL_DIR (the hook refuses it, and events are no longer spooled). Move the files: systemctl stop $SERVICE; mv $STATE_DIR/<file> $RECEIVER_STATE_DIR/ (a SQLite database with its -wal/-shm/-journal files); update DATABASE_URL (sqlite:///$RECEIVER_STATE_DIR/<file>) in $ENV_FILE; run $PROG receiver again."
        else
            ensure_mode_owner "$dir" 0755 "$(root_owner)"
        fi
    else
        ensure_dir "$dir" 0755
    fi
    ensure_dir "$ROOT$RECEIVER_STATE_DIR" 0750 "$owner"
}

# The hookscript's spool: root's, 0700, and nothing but root may write above it.
# The hook refuses a spool that is a symlink, not root's or writable by others
# (docs/hookscript.md, "Security"); this makes sure it gets one it accepts.
ensure_spool_dir() {
    local spool=$1 dir path uid mode parent="" part
    local -a parts=()
    case $spool in
    /*) ;;
    *)
        warn "SPOOL_DIR=$spool in $HOOK_CONF is not an absolute path: the hookscript refuses it, so events that cannot be sent are lost"
        return 0
        ;;
    esac
    while [ "${#spool}" -gt 1 ] && [[ $spool == */ ]]; do spool=${spool%/}; done
    dir="$ROOT$spool"
    if [ ! -e "$(dirname "$dir")" ]; then
        ensure_dir "$(dirname "$dir")" 0755 # mkdir -p: every new parent root's, 0755 (umask 022)
    fi
    if [ -L "$dir" ] || { [ -e "$dir" ] && [ ! -d "$dir" ]; }; then
        die "the spool $spool exists but is not a directory (a symlink or a file): the hookscript refuses it. Look at what it is, remove it, and run $PROG again"
    fi
    if [ -d "$dir" ]; then
        uid=$(stat -c %u "$dir")
        if [ "$uid" != "$(root_uid)" ]; then
            die "the spool $spool belongs to uid $uid, not root: the hookscript refuses it, and its files may have been planted. Look at them, remove the directory, and run $PROG again"
        fi
        ensure_mode_owner "$dir" 0700
        say "  spool $spool: root's, 0700"
    else
        ensure_dir "$dir" 0700
        [ "$DRY_RUN" = 1 ] || say "  spool $spool: created (root's, 0700)"
    fi
    # The directories above it: whoever may write to one could swap the spool.
    IFS=/ read -r -a parts <<<"$(dirname "$spool")"
    for part in "${parts[@]}"; do
        [ -n "$part" ] || continue
        parent+=/$part
        path="$ROOT$parent"
        [ -d "$path" ] || continue
        read -r uid mode < <(stat -c '%u %a' "$path")
        if [ "$uid" != "$(root_uid)" ] || { (((8#$mode) & 8#022)) && ! (((8#$mode) & 8#1000)); }; then
            warn "$parent (uid $uid, mode $mode) is writable by someone other than root, who could then swap the spool $spool for their own (the hookscript refuses that, and events are no longer spooled). If a receiver installed by an earlier install.sh runs on this host, run '$PROG receiver' again: it gives $STATE_DIR back to root."
        fi
    done
}

# --- where the product comes from --------------------------------------------------

# A checkout: install.sh beside pyproject.toml and receiver/. Otherwise an installed
# package: the `pve-janitor` command (PVE_JANITOR_COMMAND, else PREFIX's venv, else
# PATH) names its hookscript, and the unit template lies beside it (receiver/data/).
find_source() {
    local cmd="" candidate path
    if [ -f "$REPO_DIR/pyproject.toml" ] && [ -d "$REPO_DIR/receiver" ]; then
        SOURCE=checkout DATA_DIR=$REPO_DIR/receiver/data HOOK_SOURCE=$REPO_DIR/hookscript/$HOOK_NAME
        return 0
    fi
    for candidate in "${PVE_JANITOR_COMMAND:-}" "$ROOT$PREFIX/venv/bin/pve-janitor" "$(command -v pve-janitor 2>/dev/null || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then cmd=$candidate && break; fi
    done
    [ -n "$cmd" ] ||
        die "$REPO_DIR is not a pve-janitor checkout, and no installed pve-janitor was found (PVE_JANITOR_COMMAND, $PREFIX/venv/bin/pve-janitor, PATH): run install.sh from a checkout, or install the package first (docs/install-script.md, \"From an installed package\")"
    path=$("$cmd" hookscript --path 2>/dev/null) || path=""
    { [ -n "$path" ] && [ -f "$path" ]; } ||
        die "'$cmd hookscript --path' names no hookscript: that pve-janitor is too old or not pve-janitor; install the package again"
    SOURCE=package DATA_DIR=$(dirname "$path") HOOK_SOURCE=$path
}

# The package extra the driver of a DATABASE_URL comes with, or nothing (SQLite).
url_extra() {
    local scheme=${1%%://*}
    [ "$scheme" != "$1" ] || return 0
    case ${scheme%%+*} in
    postgresql | postgres) printf postgres ;;
    mysql | mariadb) printf mysql ;;
    esac
}

# --- receiver ---------------------------------------------------------------------

generate_secret() {
    local value=""
    value=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' 2>/dev/null) ||
        value=$(openssl rand -hex 32 2>/dev/null) || value=""
    [[ $value =~ ^[0-9a-f]{64}$ ]] || die "cannot generate a secret (neither $PYTHON nor openssl worked)"
    printf '%s' "$value"
}

# What the venv was installed from: the package sources and the pip settings.
source_fingerprint() {
    (
        cd "$REPO_DIR"
        local files=(pyproject.toml)
        [ -f README.md ] && files+=(README.md)
        [ -f constraints.txt ] && files+=(constraints.txt)
        find "${files[@]}" receiver -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 |
            LC_ALL=C sort -z | xargs -0 sha256sum
        printf 'extras=%s\npip-args=%s\n' "$EXTRAS" "${PVE_JANITOR_PIP_ARGS:-}"
    ) | sha256sum | cut -d' ' -f1
}

env_template() { # $1, $2: the two secrets
    cat <<EOF
# pve-janitor receiver settings: the EnvironmentFile of $SERVICE.service.
# Written by install.sh; running install.sh again keeps every value in here.
# KEY=value lines, no quotes needed. Keep this file 0600: it holds secrets.
# All settings: docs/install-script.md and the configuration reference.

# Generated at install time. Each Proxmox node's hookscript needs the same
# CLEANUP_HOOK_SECRET (install.sh node --url ... --secret-file FILE).
# CLEANUP_ADMIN_TOKEN is the bearer token of POST /api/v1/system/cleanup/run.
CLEANUP_HOOK_SECRET=$1
CLEANUP_ADMIN_TOKEN=$2

# The platform database (SQLAlchemy URL), for example
#   postgresql+psycopg://janitor:PASSWORD@db.example:5432/platform   (install with --extras postgres)
#   mysql+pymysql://janitor:PASSWORD@db.example:3306/platform        (install with --extras mysql)
#   sqlite:///$RECEIVER_STATE_DIR/platform.db   (the service may write only under $RECEIVER_STATE_DIR)
#DATABASE_URL=

# The Proxmox API, with a read-only token (role PVEAuditor on /, for the user AND
# the token: a privilege-separated token holds only what its user holds too):
#   pveum user add janitor@pve
#   pveum acl modify / --users janitor@pve --roles PVEAuditor
#   pveum user token add janitor@pve sweep --privsep 1
#   pveum acl modify / --tokens 'janitor@pve!sweep' --roles PVEAuditor
# PVE_HOST may list several nodes (pve1:8006,pve2:8006): the first one that answers
# and is quorate is read from.
#PVE_HOST=pve1.example.com:8006
#PVE_USER=janitor@pve
#PVE_TOKEN_NAME=sweep
#PVE_TOKEN_VALUE=
#PVE_VERIFY_SSL=true

# Where the receiver listens (default 127.0.0.1:8765). The hookscripts on the
# nodes must reach it: use this host's address, or 0.0.0.0:8765.
#CLEANUP_BIND=127.0.0.1:8765

# Safe first setting: log and report, change nothing. Before setting it to
# false, check the setup with \`pve-janitor check\` and \`pve-janitor sweep --dry-run\`:
#   set -a; . $ENV_FILE; set +a
#   $PREFIX/venv/bin/pve-janitor check
#   $PREFIX/venv/bin/pve-janitor sweep --dry-run
# then: systemctl restart $SERVICE
CLEANUP_DRY_RUN=true
EOF
}

# The old layout's state directory, writable, as long as it still holds files (see setup_state_dirs).
legacy_rw_path() {
    if [ "$LEGACY_STATE" = 1 ]; then
        printf '# Until its files move to %s (see install.sh receiver):\nReadWritePaths=%s\n' "$RECEIVER_STATE_DIR" "$STATE_DIR"
    fi
}

# The unit: the package's receiver/data/pve-janitor.service, with this install's
# header and prefix, and the old layout's state directory when it still holds files.
unit_text() {
    local template body
    template=$(cat "$DATA_DIR/$SERVICE.service") || die "cannot read the unit template $DATA_DIR/$SERVICE.service"
    [[ $template == *$'\n[Unit]'* && $template == *$'\n[Install]'* ]] ||
        die "$DATA_DIR/$SERVICE.service is not pve-janitor's unit (no [Unit] or [Install] section)"
    body="[Unit]${template#*$'\n[Unit]'}" # the shipped header comment gives way to this one
    body=${body//"$DEFAULT_PREFIX/venv/"/"$PREFIX/venv/"}
    printf "# Written by pve-janitor's install.sh; running it again rewrites this file.\n"
    printf '# Local changes belong in a drop-in: systemctl edit %s\n' "$SERVICE"
    printf '%s' "${body%%$'\n[Install]'*}"
    legacy_rw_path
    printf '\n[Install]%s\n' "${body#*$'\n[Install]'}"
}

systemd_running() {
    command -v systemctl >/dev/null 2>&1 || return 1
    case ${PVE_JANITOR_ASSUME_SYSTEMD:-} in
    1) return 0 ;;
    0) return 1 ;;
    esac
    [ -d "$ROOT/run/systemd/system" ]
}

install_receiver() {
    local venv="$ROOT$PREFIX/venv" owner fingerprint stamp nologin changed=0 name value status extra
    local -a pip_extra=()

    require_root "$PREFIX"
    find_source
    if [ "$SOURCE" = package ] && [ ! -x "$venv/bin/pve-janitor" ]; then
        die "$REPO_DIR is not a pve-janitor checkout, and $PREFIX/venv has no pve-janitor: run install.sh from a checkout, or install the package into that venv first: $PYTHON -m venv $PREFIX/venv && $PREFIX/venv/bin/pip install 'pve-janitor[postgres]' (docs/install-script.md)"
    fi
    if [ -n "$ROOT" ] && { [ ! -f "$ROOT/etc/passwd" ] || [ ! -f "$ROOT/etc/group" ]; }; then
        die "--root $ROOT has no etc/passwd and etc/group, where the service user $SERVICE_USER is added (useradd --prefix): give --root a system tree, e.g. a container's root file system"
    fi
    command -v "$PYTHON" >/dev/null 2>&1 ||
        die "$PYTHON not found: install Python 3.10 or newer (or set PVE_JANITOR_PYTHON)"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' ||
        die "$PYTHON is older than 3.10; pve-janitor needs Python 3.10 or newer (set PVE_JANITOR_PYTHON)"
    if [ -n "${PVE_JANITOR_PIP_ARGS:-}" ]; then
        read -r -a pip_extra <<<"$PVE_JANITOR_PIP_ARGS"
    fi

    say "pve-janitor receiver -> $ROOT$PREFIX"

    # The service user.
    if [ -z "$(user_entry)" ]; then
        command -v useradd >/dev/null 2>&1 ||
            die "useradd not found: create a system user '$SERVICE_USER' yourself, then run $PROG again"
        nologin=/usr/sbin/nologin
        [ -x "$nologin" ] || nologin=/sbin/nologin
        [ -x "$nologin" ] || nologin=/bin/false
        if [ -n "$ROOT" ]; then
            run useradd --prefix "$ROOT" --system --user-group --home-dir "$RECEIVER_STATE_DIR" --no-create-home --shell "$nologin" "$SERVICE_USER" ||
                die "useradd could not add $SERVICE_USER to $ROOT/etc/passwd"
        else
            run useradd --system --user-group --home-dir "$RECEIVER_STATE_DIR" --no-create-home --shell "$nologin" "$SERVICE_USER" ||
                die "useradd could not add $SERVICE_USER: create the system user yourself, then run $PROG again"
        fi
    else
        say "  user $SERVICE_USER: exists"
    fi
    owner=$(service_owner)
    if [ -z "$owner" ]; then
        [ "$DRY_RUN" = 1 ] || die "user $SERVICE_USER does not exist after useradd${ROOT:+ (looked in $ROOT/etc/passwd)}"
        owner=$SERVICE_USER:$SERVICE_USER
    fi

    ensure_dir "$ROOT$CONF_DIR" 0755
    setup_state_dirs "$owner"

    # The extra that brings DATABASE_URL's driver: the env file's, else the environment's.
    extra=$(url_extra "$(conf_get "$ROOT$ENV_FILE" DATABASE_URL)")
    [ -n "$extra" ] || [ -n "$(conf_get "$ROOT$ENV_FILE" DATABASE_URL)" ] || extra=$(url_extra "${DATABASE_URL:-}")
    if [ -n "$extra" ] && [[ ",$EXTRAS," != *",$extra,"* ]]; then
        EXTRAS=${EXTRAS:+$EXTRAS,}$extra
        say "  extras: $extra (the driver DATABASE_URL needs)"
    fi

    # The venv and the package: a checkout's, installed with the tested versions
    # (constraints.txt); an installed package is the operator's and stays as it is.
    if [ "$SOURCE" = package ]; then
        say "  package: installed in $venv (install.sh leaves it as it is)"
        [ -z "$EXTRAS" ] || say "  extras $EXTRAS: if missing, $PREFIX/venv/bin/pip install 'pve-janitor[$EXTRAS]'"
    else
        if [ -x "$venv/bin/python" ]; then
            say "  venv $venv: exists"
        else
            run "$PYTHON" -m venv "$venv" ||
                die "could not create the venv $venv (on Debian/Ubuntu: apt-get install python3-venv)"
        fi
        fingerprint=$(source_fingerprint)
        stamp=$(cat "$venv/.pve-janitor-source" 2>/dev/null || true)
        if [ -x "$venv/bin/pve-janitor" ] && [ "$stamp" = "$fingerprint" ]; then
            say "  package: up to date with $REPO_DIR"
        else
            [ ! -f "$REPO_DIR/constraints.txt" ] || pip_extra+=(--constraint "$REPO_DIR/constraints.txt")
            run "$venv/bin/pip" install --disable-pip-version-check ${pip_extra[@]+"${pip_extra[@]}"} "$REPO_DIR${EXTRAS:+[$EXTRAS]}" ||
                die "pip install failed (extra pip arguments come from PVE_JANITOR_PIP_ARGS)"
            if [ "$DRY_RUN" = 1 ]; then
                say "DRY-RUN: write $venv/.pve-janitor-source"
            else
                printf '%s\n' "$fingerprint" >"$venv/.pve-janitor-source"
            fi
            changed=1
        fi
    fi

    # The environment file: secrets generated once, everything that is there kept.
    if [ -f "$ROOT$ENV_FILE" ]; then
        CONTENT=$(cat "$ROOT$ENV_FILE"; printf x)
        CONTENT=${CONTENT%x}
        append_secrets_to_env
    else
        if [ "$DRY_RUN" = 1 ]; then
            name=dry-run value=dry-run
        else
            name=$(generate_secret)
            value=$(generate_secret)
        fi
        CONTENT=$(env_template "$name" "$value")$'\n'
        say "  CLEANUP_HOOK_SECRET: (generated)"
        say "  CLEANUP_ADMIN_TOKEN: (generated)"
    fi
    # Root's, readable by the service's group: systemd reads it as root, `check` run as the
    # service user reads it too, and the service cannot change its own settings or secrets.
    write_file "$ROOT$ENV_FILE" 0640 "$(root_uid):${owner#*:}"
    if [ "$WROTE" = 1 ]; then
        changed=1
        [ "$DRY_RUN" = 1 ] || say "  $ROOT$ENV_FILE: written (mode 0640, owner root, group $SERVICE_USER)"
    else
        say "  $ROOT$ENV_FILE: unchanged"
    fi

    # The unit.
    ensure_dir "$ROOT$(dirname "$UNIT_FILE")" 0755
    CONTENT=$(unit_text)$'\n'
    write_file "$ROOT$UNIT_FILE" 0644
    local unit_changed=$WROTE
    if [ "$WROTE" = 0 ]; then
        say "  $ROOT$UNIT_FILE: unchanged"
    elif [ "$DRY_RUN" = 0 ]; then
        say "  $ROOT$UNIT_FILE: written"
    fi

    if systemd_running; then
        if [ "$unit_changed" = 1 ]; then run systemctl daemon-reload; fi
        if systemctl is-enabled --quiet "$SERVICE" 2>/dev/null && systemctl is-active --quiet "$SERVICE" 2>/dev/null; then
            if [ "$changed" = 1 ] || [ "$unit_changed" = 1 ]; then
                run systemctl restart "$SERVICE"
            else
                say "  $SERVICE.service: enabled and running"
            fi
        else
            run systemctl enable --now "$SERVICE"
        fi
        status="systemctl status $SERVICE; journalctl -u $SERVICE"
    else
        say "  systemd is not running here: start the receiver by hand, as $SERVICE_USER:"
        say "    set -a; . $ENV_FILE; set +a; $PREFIX/venv/bin/pve-janitor serve"
        status="the output of pve-janitor serve"
    fi

    cat <<EOF

Next steps:
  1. Edit $ENV_FILE: DATABASE_URL, PVE_HOST, PVE_USER, PVE_TOKEN_NAME,
     PVE_TOKEN_VALUE, and CLEANUP_BIND so the nodes can reach the receiver.
     Until they are set the service stops with a configuration error (exit 2).
     Then run $PROG receiver again: it installs the driver DATABASE_URL needs.
  2. Check as the service user, who meets what the service will (the same files,
     database and Proxmox permissions):
       sudo -u $SERVICE_USER sh -c 'set -a; . $ENV_FILE; set +a
         $PREFIX/venv/bin/pve-janitor check && $PREFIX/venv/bin/pve-janitor sweep --dry-run'
  3. Set CLEANUP_DRY_RUN=false and restart the service; watch: $status.
  4. On every Proxmox node (CLEANUP_HOOK_SECRET is in $ENV_FILE):
       ./install.sh node --url http://THIS-HOST:8765 --secret-file FILE
     then, once every node has the hookscript, on each node:
       ./install.sh node --url http://THIS-HOST:8765 --secret-file FILE --attach all
EOF
}

# Appends the secrets the env file lacks (or has empty) to $CONTENT, the file's
# exact text: nothing that is there changes, a later line wins for systemd and sh.
append_secrets_to_env() {
    local name value
    if [ -n "$CONTENT" ] && [ "${CONTENT: -1}" != $'\n' ]; then CONTENT+=$'\n'; fi
    for name in CLEANUP_HOOK_SECRET CLEANUP_ADMIN_TOKEN; do
        value=$(conf_get "$ROOT$ENV_FILE" "$name")
        if [ -n "$value" ]; then
            say "  $name: (kept)"
            if ! secret_is_plain "$value"; then
                warn "$name in $ENV_FILE holds characters other than letters, digits and ._~+/=-, which systemd, the shell ('. $ENV_FILE') and the hookscript read differently (install.sh node refuses such a secret); replace it, e.g. with the output of: openssl rand -hex 32"
            fi
            continue
        fi
        if [ "$DRY_RUN" = 1 ]; then value=dry-run; else value=$(generate_secret); fi
        CONTENT+="# $name generated by install.sh"$'\n'"$name=$value"$'\n'
        say "  $name: (generated)"
    done
}

# --- node -------------------------------------------------------------------------

STORAGE_CFG=/etc/pve/storage.cfg

# The content types of storage 'local': from storage.cfg, else from pvesh.
# Prints them; exit status 3 when the storage does not exist.
local_storage_content() {
    local cfg="$ROOT$STORAGE_CFG" json
    if [ -f "$cfg" ]; then
        awk '
            /^[^[:space:]#]/ {
                line = $0; sub(/^[^:]*:[[:space:]]*/, "", line); sub(/[[:space:]].*$/, "", line)
                insec = (line == "local"); if (insec) found = 1; next
            }
            insec && $1 == "content" { v = $0; sub(/^[[:space:]]*content[[:space:]]+/, "", v); gsub(/[[:space:]]/, "", v); print v }
            END { exit(found ? 0 : 3) }
        ' "$cfg"
        return
    fi
    json=$(pvesh get /storage/local --output-format json 2>/dev/null) || return 3
    printf '%s' "$json" | grep -o '"content"[[:space:]]*:[[:space:]]*"[^"]*"' | sed -E 's/.*"([^"]*)"$/\1/' || true
}

ensure_snippets() {
    local content rc=0 new item
    content=$(local_storage_content) || rc=$?
    if [ "$rc" = 3 ]; then
        die "storage 'local' not found (in $ROOT$STORAGE_CFG or pvesh get /storage/local): the hookscript volume $HOOK_VOLUME needs it"
    elif [ "$rc" != 0 ]; then
        die "cannot read the content types of storage 'local'"
    fi
    if [ -z "$content" ]; then
        die "storage 'local' has no 'content' line in $ROOT$STORAGE_CFG, so install.sh cannot tell which content types to keep; run 'pvesm set local --content <the types it has>,snippets' yourself, then run install.sh again"
    fi
    if [[ ",$content," == *,snippets,* ]]; then
        say "  storage local: allows snippets ($content)"
        return 0
    fi
    new=""
    IFS=, read -r -a items <<<"$content"
    for item in "${items[@]}"; do
        [ -n "$item" ] && [ "$item" != none ] && new+="$item,"
    done
    new+=snippets
    say "  storage local: content $content -> $new"
    run pvesm set local --content "$new" || die "pvesm set local --content $new failed"
}

# local:snippets/x -> /var/lib/vz/snippets/x; other storages through pvesm path.
volume_path() {
    local volid=$1
    case $volid in
    local:snippets/*) printf '%s/%s' "$SNIPPETS_DIR" "${volid#local:snippets/}" ;;
    /*) printf '%s' "$volid" ;;
    *) pvesm path "$volid" 2>/dev/null ;;
    esac
}

# The other nodes of this cluster, one per line (this node, the one install.sh runs
# on, is left out: it has the hookscript by now). Status 1 when pvesh cannot list them.
other_cluster_nodes() {
    local json here node
    here=${PVE_JANITOR_NODE:-$(uname -n)}
    here=${here%%.*}
    json=$(pvesh get /nodes --output-format json 2>/dev/null) || return 1
    printf '%s' "$json" | grep -o '"node"[[:space:]]*:[[:space:]]*"[^"]*"' | sed -E 's/.*"([^"]*)"$/\1/' |
        sort -u | while IFS= read -r node; do
        # Proxmox node names are host names; anything else is not used in a pvesh path.
        [[ $node =~ ^[A-Za-z0-9][A-Za-z0-9.-]*$ ]] && [ "$node" != "$here" ] && printf '%s\n' "$node"
    done
    return 0
}

# NODE... -> "node (why)" for each that lacks local:snippets/$HOOK_NAME or cannot be asked.
nodes_without_hook() {
    local node content
    for node in "$@"; do
        if ! content=$(pvesh get "/nodes/$node/storage/local/content" --content snippets --output-format json 2>/dev/null); then
            printf '%s\n' "$node (cannot tell: 'pvesh get /nodes/$node/storage/local/content' failed, the node may be offline)"
        elif ! printf '%s' "$content" | grep -q "\"volid\"[[:space:]]*:[[:space:]]*\"$HOOK_VOLUME\""; then
            printf '%s\n' "$node (no $HOOK_VOLUME)"
        fi
    done
}

guest_hookscript() { # TOOL VMID -> the hookscript volume, or nothing; status 1 when unreadable
    local out
    out=$("$1" config "$2" 2>/dev/null) || return 1
    printf '%s\n' "$out" | awk '$1 == "hookscript:" { print $2; exit }'
}

install_node() {
    local src dest="$ROOT$SNIPPETS_DIR/$HOOK_NAME" conf="$ROOT$HOOK_CONF"
    local tool missing=() vmid kind current chain_path existing_chain new_chain="" line key out seen spool
    local -a guests=() to_attach=() attach_kinds=() skipped=() failed=() already=() chained=() others=() lacking=()
    local -A ct_ids=() vm_ids=() want=()

    require_root "$SNIPPETS_DIR"
    for tool in pct qm pvesm; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        die "${missing[*]} not found on PATH: '$PROG node' must run on a Proxmox VE node (install the receiver elsewhere with '$PROG receiver')"
    fi
    find_source
    src=$HOOK_SOURCE
    [ -f "$src" ] || die "$src not found: run install.sh from a complete checkout, or from an installed package"
    if [ -z "$ROOT" ] && ! /usr/bin/python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
        die "/usr/bin/python3 (3.9 or newer) is missing: the hookscript needs it, and a hookscript that cannot run stops guests from starting"
    fi

    say "pve-janitor hookscript -> $dest"

    # 1. The hookscript (temp file + rename: a guest starting meanwhile never runs half a file).
    ensure_dir "$ROOT$SNIPPETS_DIR" 0755
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        ensure_mode_owner "$dest" 0755
        say "  $dest: unchanged"
    elif [ "$DRY_RUN" = 1 ]; then
        say "DRY-RUN: install -m 0755 $src $dest"
    else
        local tmp
        tmp=$(mktemp "$ROOT$SNIPPETS_DIR/.$HOOK_NAME.XXXXXX")
        if ! { cp "$src" "$tmp" && chmod 0755 "$tmp" && mv -f "$tmp" "$dest"; }; then
            rm -f "$tmp"
            die "cannot install $dest"
        fi
        say "  $dest: installed (mode 0755)"
    fi

    # The spool, where the hook keeps events it could not send: root's, 0700.
    spool=$(conf_get "$conf" SPOOL_DIR)
    ensure_spool_dir "${spool:-$DEFAULT_SPOOL_DIR}"

    # 2. Storage 'local' must allow snippets, or the volume cannot be attached.
    ensure_snippets

    # 3. Which guests get the hookscript (decided before hook.conf is written, so
    #    that a CHAIN is recorded before any guest relies on it).
    if [ -n "$ATTACH" ]; then
        out=$(pct list) || die "'pct list' failed: cannot tell which containers are on this node"
        for vmid in $(printf '%s\n' "$out" | awk '$1 ~ /^[0-9]+$/ { print $1 }'); do ct_ids[$vmid]=1; done
        out=$(qm list) || die "'qm list' failed: cannot tell which VMs are on this node"
        for vmid in $(printf '%s\n' "$out" | awk '$1 ~ /^[0-9]+$/ { print $1 }'); do vm_ids[$vmid]=1; done
        if [ "$ATTACH" = all ]; then
            mapfile -t guests < <(printf '%s\n' "${!ct_ids[@]}" "${!vm_ids[@]}" | awk 'NF' | sort -n -u)
        else
            guests=("${ATTACH_IDS[@]}")
        fi
    fi
    existing_chain=$(conf_get "$conf" CHAIN)
    for vmid in ${guests[@]+"${guests[@]}"}; do
        if [ -n "${ct_ids[$vmid]:-}" ]; then
            tool=pct kind=CT
        elif [ -n "${vm_ids[$vmid]:-}" ]; then
            tool=qm kind=VM
        else
            failed+=("$vmid: no such container or VM on this node")
            continue
        fi
        if ! current=$(guest_hookscript "$tool" "$vmid"); then
            failed+=("$vmid ($kind): '$tool config $vmid' failed")
            continue
        fi
        if [ -z "$current" ]; then
            to_attach+=("$vmid") attach_kinds+=("$tool")
        elif [ "$current" = "$HOOK_VOLUME" ]; then
            already+=("$vmid")
        elif [ "$CHAIN" != 1 ]; then
            skipped+=("$vmid ($kind): has its own hookscript $current; --chain would run it from $HOOK_NAME")
        elif ! chain_path=$(volume_path "$current") || [ -z "$chain_path" ]; then
            skipped+=("$vmid ($kind): has hookscript $current, whose path 'pvesm path' cannot tell")
        elif [ -z "$new_chain" ] && { [ -z "$existing_chain" ] || [ "$existing_chain" = "$chain_path" ]; }; then
            new_chain=$chain_path
            chained+=("$vmid") to_attach+=("$vmid") attach_kinds+=("$tool")
        elif [ "$chain_path" = "$new_chain" ]; then
            chained+=("$vmid") to_attach+=("$vmid") attach_kinds+=("$tool")
        else
            skipped+=("$vmid ($kind): has hookscript $current, but hook.conf can CHAIN only one script and already runs ${new_chain:-$existing_chain}")
        fi
    done

    # 3b. A guest's hookscript setting is cluster-wide, the snippet file is per node:
    #     a guest that migrates or is HA-recovered to a node without the file does
    #     not start there (Proxmox aborts pre-start). So every node must have it first.
    if [ "${#to_attach[@]}" -gt 0 ]; then
        if out=$(other_cluster_nodes); then
            mapfile -t others < <(printf '%s' "$out" | awk 'NF')
            mapfile -t lacking < <(nodes_without_hook ${others[@]+"${others[@]}"})
        else
            lacking=("(every other node: 'pvesh get /nodes' failed, so install.sh cannot tell which nodes this cluster has)")
        fi
        if [ "${#lacking[@]}" -gt 0 ] && [ "$FORCE_ATTACH" != 1 ]; then
            printf '%s: error: not attaching: a guest that migrates (or is HA-recovered) to a node without %s does not start there (Proxmox aborts pre-start when the hookscript is missing), and these nodes lack it:\n' "$PROG" "$HOOK_VOLUME" >&2
            printf '  %s\n' "${lacking[@]}" >&2
            printf "Run '%s node --url ... --secret-file ...' (without --attach) on each of them first, then this again; or pass --force-attach to attach anyway.\n" "$PROG" >&2
            exit 1
        fi
        if [ "${#lacking[@]}" -gt 0 ]; then
            warn "--force-attach: attaching although these nodes lack $HOOK_VOLUME; a guest of this node that migrates or is HA-recovered to one of them will NOT start there until '$PROG node' has run on it:"
            printf '  %s\n' "${lacking[@]}" >&2
        fi
        if [ "${#chained[@]}" -gt 0 ] && [ "${#others[@]}" -gt 0 ]; then
            warn "CHAIN=${new_chain} is written to this node's $HOOK_CONF only. On another node $HOOK_NAME runs without it, so a chained guest (${chained[*]}) that migrates there loses its own hookscript, including its veto in pre-start. Give every node the same CHAIN line (and the same script): ${others[*]}."
        fi
    fi

    # 4. hook.conf: URL and SECRET as given; TIMEOUT, SPOOL_DIR, CHAIN and any other
    #    lines the file already has are kept.
    ensure_dir "$ROOT$CONF_DIR" 0755
    want[URL]=$URL want[SECRET]=$SECRET
    conf_has "$conf" TIMEOUT || want[TIMEOUT]=$DEFAULT_TIMEOUT
    conf_has "$conf" SPOOL_DIR || want[SPOOL_DIR]=$DEFAULT_SPOOL_DIR
    [ -n "$new_chain" ] && [ "$new_chain" != "$existing_chain" ] && want[CHAIN]=$new_chain
    out="" seen=" "
    if [ -f "$conf" ]; then
        while IFS= read -r line || [ -n "$line" ]; do
            key=$(line_key "$line")
            if [ -n "$key" ] && [ -n "${want[$key]+x}" ]; then
                [[ $seen == *" $key "* ]] && continue
                out+="$key=${want[$key]}"$'\n' seen+="$key "
            else
                out+="$line"$'\n'
            fi
        done <"$conf"
    else
        out="# pve-janitor hookscript settings (docs/hookscript.md), written by install.sh."$'\n'
        out+="# Keep this file 0600: it holds the secret."$'\n'
    fi
    for key in URL SECRET TIMEOUT SPOOL_DIR CHAIN; do
        if [ -n "${want[$key]+x}" ] && [[ $seen != *" $key "* ]]; then out+="$key=${want[$key]}"$'\n'; fi
    done
    CONTENT=$out
    write_file "$conf" 0600
    if [ "$WROTE" = 1 ]; then
        say "  $conf: $([ "$DRY_RUN" = 1 ] && echo "would be written" || echo written) (mode 0600): URL=$URL SECRET=(set)${new_chain:+ CHAIN=$new_chain}"
    else
        say "  $conf: unchanged"
    fi
    if [ -n "$new_chain" ] && [ ! -x "$ROOT$new_chain" ]; then
        warn "CHAIN=$new_chain is not an executable file on this node"
    fi

    # 5. Attach.
    local i
    for i in "${!to_attach[@]}"; do
        vmid=${to_attach[$i]}
        if ! run "${attach_kinds[$i]}" set "$vmid" --hookscript "$HOOK_VOLUME"; then
            failed+=("$vmid: '${attach_kinds[$i]} set $vmid --hookscript $HOOK_VOLUME' failed")
        fi
    done

    # 6. Report.
    if [ -n "$ATTACH" ]; then
        say ""
        say "Guests: ${#to_attach[@]} attached, ${#already[@]} already had $HOOK_NAME, ${#skipped[@]} skipped, ${#failed[@]} failed."
        if [ "${#chained[@]}" -gt 0 ]; then
            say "Chained (their hookscript ${new_chain} now runs first, from $HOOK_NAME): ${chained[*]}"
            say "  Note: CHAIN runs for every guest that uses $HOOK_NAME on this node, not only these."
        fi
        if [ "${#skipped[@]}" -gt 0 ]; then
            say "Skipped, hookscript left as it is:"
            printf '  %s\n' "${skipped[@]}"
        fi
        if [ "${#failed[@]}" -gt 0 ]; then
            printf '%s: error: not attached:\n' "$PROG" >&2
            printf '  %s\n' "${failed[@]}" >&2
        fi
    fi
    cat <<EOF

To attach the hookscript when the platform creates a guest, add to its create call:
  pct create <vmid> ... --hookscript $HOOK_VOLUME
  qm create <vmid> ... --hookscript $HOOK_VOLUME
(or the 'hookscript' parameter of POST /nodes/{node}/lxc). Only root@pam may set a
hookscript: no API token can, not even one of root. The file must exist on every
node the guest may start on: run '$PROG node' on each node.
EOF
    if [ "${#failed[@]}" -gt 0 ]; then exit 1; fi
}

# --- arguments --------------------------------------------------------------------

MODE="" ROOT="" DRY_RUN=0 PREFIX=$DEFAULT_PREFIX PREFIX_SET=0 EXTRAS=""
URL="" URL_SET=0 SECRET="" SECRET_SET=0 SECRET_FILE="" ATTACH="" CHAIN=0 FORCE_ATTACH=0
ATTACH_IDS=()
PYTHON=${PVE_JANITOR_PYTHON:-python3}

need_value() {
    if [ "$#" -lt 2 ] || [[ $2 == --* ]]; then usage_error "$1 needs a value"; fi
}

while [ "$#" -gt 0 ]; do
    case $1 in
    --root=* | --prefix=* | --extras=* | --url=* | --secret=* | --secret-file=* | --attach=*)
        set -- "${1%%=*}" "${1#*=}" "${@:2}"
        continue
        ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --chain) CHAIN=1 ;;
    --force-attach) FORCE_ATTACH=1 ;;
    --root) need_value "$@"; ROOT=$2; shift ;;
    --prefix) need_value "$@"; PREFIX=$2 PREFIX_SET=1; shift ;;
    --extras) need_value "$@"; EXTRAS=$2; shift ;;
    --url) need_value "$@"; URL=$2 URL_SET=1; shift ;;
    --secret) need_value "$@"; SECRET=$2 SECRET_SET=1; shift ;;
    --secret-file) need_value "$@"; SECRET_FILE=$2; shift ;;
    --attach)
        need_value "$@"
        shift
        if [ "$1" = all ]; then
            ATTACH=all
        else
            ATTACH=ids
            [[ $1 =~ ^[0-9,]+$ ]] || usage_error "--attach takes 'all' or VMIDs, not '$1'"
            while [ "$#" -gt 0 ] && [[ $1 =~ ^[0-9,]+$ ]]; do
                IFS=, read -r -a ids <<<"$1"
                for id in "${ids[@]}"; do
                    [ -z "$id" ] && continue
                    [[ $id =~ ^[1-9][0-9]{0,8}$ ]] || usage_error "--attach: '$id' is not a VMID"
                    [[ " ${ATTACH_IDS[*]-} " == *" $id "* ]] || ATTACH_IDS+=("$id")
                done
                shift
            done
            continue
        fi
        ;;
    -*) usage_error "unknown option: $1" ;;
    *)
        if [ -z "$MODE" ]; then MODE=$1; else usage_error "unexpected argument: $1"; fi
        ;;
    esac
    shift
done

case $MODE in
receiver | node) ;;
"") usage_error "which mode: receiver or node?" ;;
*) usage_error "unknown mode '$MODE' (receiver or node)" ;;
esac

if [ -n "$ROOT" ]; then
    [[ $ROOT == /* ]] || ROOT=$PWD/$ROOT
    ROOT=${ROOT%/}
    [ -n "$ROOT" ] || usage_error "--root / is the default; leave it out"
fi

if [ "$MODE" = receiver ]; then
    [ "$URL_SET" = 0 ] || usage_error "--url is for node mode"
    { [ "$SECRET_SET" = 0 ] && [ -z "$SECRET_FILE" ]; } || usage_error "--secret/--secret-file are for node mode"
    [ "$CHAIN" = 0 ] || usage_error "--chain is for node mode"
    [ -z "$ATTACH" ] || usage_error "--attach is for node mode"
    [ "$FORCE_ATTACH" = 0 ] || usage_error "--force-attach is for node mode"
    { [[ $PREFIX =~ ^/[A-Za-z0-9._/+-]*$ ]] && [[ $PREFIX != */ ]]; } ||
        usage_error "--prefix '$PREFIX' must be an absolute path of letters, digits and ._+-/ (no trailing /)"
    [[ $EXTRAS =~ ^[A-Za-z0-9_,-]*$ ]] || usage_error "--extras '$EXTRAS' must be a comma-separated list of extras, e.g. postgres,mysql"
    install_receiver
else
    [ "$PREFIX_SET" = 0 ] || usage_error "--prefix is for receiver mode"
    [ -z "$EXTRAS" ] || usage_error "--extras is for receiver mode"
    [ "$URL_SET" = 1 ] || usage_error "node mode needs --url (the receiver, e.g. http://10.0.0.5:8765)"
    validate_url "$URL"
    URL=${URL%/}
    if [ -n "$SECRET_FILE" ]; then
        [ "$SECRET_SET" = 0 ] || usage_error "give --secret or --secret-file, not both"
        [ -r "$SECRET_FILE" ] || usage_error "--secret-file $SECRET_FILE cannot be read"
        IFS= read -r SECRET <"$SECRET_FILE" || true
        SECRET=${SECRET%$'\r'}
    elif [ "$SECRET_SET" = 0 ]; then
        usage_error "node mode needs --secret SECRET or --secret-file FILE (the receiver's CLEANUP_HOOK_SECRET)"
    fi
    validate_secret "$SECRET"
    [ "$CHAIN" = 0 ] || [ -n "$ATTACH" ] || usage_error "--chain only matters with --attach"
    [ "$FORCE_ATTACH" = 0 ] || [ -n "$ATTACH" ] || usage_error "--force-attach only matters with --attach"
    install_node
fi
