#!/usr/bin/env bash
# Install (or upgrade, or uninstall) llm-supervisor on a GPU box, from this source tree.
#
#   scripts/install.sh                  # install or upgrade; idempotent
#   scripts/install.sh --dry-run        # say what it would do, do nothing
#   scripts/install.sh --uninstall      # remove it; config and state stay
#   scripts/install.sh --uninstall --purge   # ... and the config, the state, the users and
#                                            # the `llm` user's home (/var/lib/llm)
#
# What it does, as root:
#   - a virtual environment under --prefix (/opt/llm-supervisor) with this package, and
#     llm-supervisor and llmctl linked into --bindir (/usr/local/bin);
#   - the system user `llm` (for services' `user = "llm"`) and the group `llm-admin` (for
#     `control_group`: members may run mutating llmctl commands);
#   - /etc/llm-supervisor/config.toml from config.toml.example if there is none (never
#     overwritten), owned root:llm-admin, mode 0640;
#   - the docs under /usr/share/doc/llm-supervisor (the unit's Documentation=);
#   - /var/log/llm-supervisor (root:llm-admin, 0750) for the audit log, and its logrotate
#     file /etc/logrotate.d/llm-supervisor (rotated daily, the daemon told by a reload);
#   - the unit, its ExecStart pointing at the venv, enabled (`systemd-analyze verify`
#     checked); an upgrade over a running supervisor leaves it running the old code until
#     `systemctl restart llm-supervisor` (or --restart), since a restart restarts the models;
#   - `llm-supervisor --check` of the config at the end.
# Options: --prefix DIR, --bindir DIR, --etc DIR, --unit-dir DIR, --doc-dir DIR,
# --log-dir DIR, --logrotate-dir DIR, --start
# (start it now, if the config passes --check), --restart (restart a running one after an
# upgrade, likewise), --dry-run, --uninstall, --purge.
# SYSTEMCTL (default: systemctl) is the command that talks to systemd.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/llm-supervisor
BINDIR=/usr/local/bin
ETC=/etc/llm-supervisor
UNITDIR=/etc/systemd/system
DOCDIR=/usr/share/doc/llm-supervisor
LOGDIR=/var/log/llm-supervisor
LOGROTATE=/etc/logrotate.d
USER_NAME=llm
GROUP_NAME=llm-admin
DRY=0; UNINSTALL=0; PURGE=0; START=0; RESTART=0
MARK=.llm-supervisor-install  # in the venv and the docs: what uninstall may remove
SYSTEMCTL=${SYSTEMCTL:-systemctl}
UNIT=llm-supervisor.service

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "install.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
    --bindir) BINDIR=${2:?--bindir needs a directory}; shift ;;
    --etc) ETC=${2:?--etc needs a directory}; shift ;;
    --unit-dir) UNITDIR=${2:?--unit-dir needs a directory}; shift ;;
    --doc-dir) DOCDIR=${2:?--doc-dir needs a directory}; shift ;;
    --log-dir) LOGDIR=${2:?--log-dir needs a directory}; shift ;;
    --logrotate-dir) LOGROTATE=${2:?--logrotate-dir needs a directory}; shift ;;
    --dry-run) DRY=1 ;;
    --uninstall) UNINSTALL=1 ;;
    --purge) PURGE=1 ;;
    --start) START=1 ;;
    --restart) RESTART=1 ;;
    -h|--help) usage 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage 2 >&2 ;;
  esac
  shift
done
[ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ] && die "--purge goes with --uninstall"
for d in "$PREFIX" "$BINDIR" "$ETC" "$UNITDIR" "$DOCDIR" "$LOGDIR" "$LOGROTATE"; do
  case "$d" in /*) ;; *) die "$d: give an absolute path" ;; esac
  case "$d" in *[[:space:]]*) die "'$d': a path with blanks cannot go in a unit file" ;; esac
  [ "$d" != / ] || die "/ is no place for it"
done
PREFIX=${PREFIX%/}; BINDIR=${BINDIR%/}; ETC=${ETC%/}; UNITDIR=${UNITDIR%/}; DOCDIR=${DOCDIR%/}
LOGDIR=${LOGDIR%/}; LOGROTATE=${LOGROTATE%/}
[ "$BINDIR" != "$PREFIX/bin" ] || die "--bindir is the venv's own bin ($PREFIX/bin)"
# the unit runs with PrivateTmp=yes: it would not see a venv or a config under /tmp or /var/tmp
for d in "$PREFIX" "$ETC"; do
  case "$(readlink -m "$d")/" in
    /tmp/*|/var/tmp/*) die "$d is under /tmp or /var/tmp, which the unit cannot see (PrivateTmp=yes): give another --prefix / --etc" ;;
  esac
done
[ "$DRY" = 1 ] || [ "$(id -u)" = 0 ] || die "run it as root (or see what it would do with --dry-run)"

run() {  # a step: shown, and done unless --dry-run
  echo "+ $*"
  [ "$DRY" = 1 ] || "$@"
}
sctl() { echo "+ $SYSTEMCTL $*"; [ "$DRY" = 1 ] || $SYSTEMCTL "$@"; }
have_systemd() { [ "$DRY" = 0 ] && $SYSTEMCTL --version >/dev/null 2>&1 && \
  [ -n "$($SYSTEMCTL is-system-running 2>/dev/null || true)" ] && \
  [ "$($SYSTEMCTL is-system-running 2>/dev/null || true)" != offline ]; }
active() { have_systemd && $SYSTEMCTL is-active --quiet "$UNIT"; }

if [ "$UNINSTALL" = 1 ]; then
  if have_systemd; then
    if active; then sctl stop "$UNIT"; fi
    if $SYSTEMCTL is-enabled --quiet "$UNIT" 2>/dev/null; then sctl disable "$UNIT"; fi
  fi
  [ -e "$UNITDIR/$UNIT" ] && run rm -f "$UNITDIR/$UNIT"
  [ -d "$UNITDIR/$UNIT.d" ] && echo "keeping $UNITDIR/$UNIT.d (your drop-ins)"
  have_systemd && sctl daemon-reload
  for b in llm-supervisor llmctl; do
    if [ -L "$BINDIR/$b" ] && [ "$(readlink "$BINDIR/$b")" = "$PREFIX/bin/$b" ]; then
      run rm -f "$BINDIR/$b"
    fi
  done
  if [ -f "$LOGROTATE/llm-supervisor" ] && grep -q "scripts/install.sh" "$LOGROTATE/llm-supervisor"; then
    run rm -f "$LOGROTATE/llm-supervisor"
  fi
  # only what this script made (its mark inside): never a directory it did not create
  for d in "$PREFIX" "$DOCDIR"; do
    if [ -f "$d/$MARK" ]; then
      run rm -rf "$d"
    elif [ -e "$d" ]; then
      echo "leaving $d: not made by install.sh (no $MARK in it)"
    fi
  done
  if [ "$PURGE" = 1 ]; then
    [ -e "$ETC/config.toml" ] && run rm -f "$ETC/config.toml"
    if [ "$DRY" = 0 ] && [ -d "$ETC" ] && rmdir "$ETC" 2>/dev/null; then echo "+ rmdir $ETC"; fi
    [ -d /var/lib/llm-supervisor ] && run rm -rf /var/lib/llm-supervisor
    [ -d "$LOGDIR" ] && run rm -rf "$LOGDIR"
    if getent passwd "$USER_NAME" >/dev/null; then
      home=$(getent passwd "$USER_NAME" | cut -d: -f6)
      run userdel "$USER_NAME"
      # its home too, when it is the one install.sh made (model caches live there)
      if [ "$home" = /var/lib/llm ] && [ -d /var/lib/llm ]; then run rm -rf /var/lib/llm; fi
    fi
    getent group "$GROUP_NAME" >/dev/null && run groupdel "$GROUP_NAME"
  else
    echo "kept: $ETC (config), /var/lib/llm-supervisor (state) and $LOGDIR (the audit log);" \
      "--purge removes them"
  fi
  if [ "$DRY" = 1 ]; then echo "dry run: nothing was changed"; else echo "llm-supervisor uninstalled"; fi
  exit 0
fi

# --- install or upgrade ---------------------------------------------------------------------

PY=$(command -v python3 || true)
[ -n "$PY" ] || die "python3 not found (apt-get install python3 python3-venv)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
  die "python3 is $("$PY" -V 2>&1 | cut -d' ' -f2); llm-supervisor needs 3.11 or newer"
if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
  if command -v apt-get >/dev/null; then
    run apt-get install -y -q python3-venv
  else
    die "python3's venv module is missing (the python3-venv package)"
  fi
fi
# a C compiler and Python's headers: the request path (the gates, the router) is compiled
# (mypyc, at the pip install below); without them it runs as pure Python, about 3x the CPU
# per request
if ! command -v gcc >/dev/null || ! "$PY" -c 'import os, sys, sysconfig; sys.exit(not
    os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  if command -v apt-get >/dev/null; then
    run apt-get install -y -q --no-install-recommends gcc python3-dev || \
      echo "note: gcc or python3-dev could not be installed: the request path will run as pure Python"
  else
    echo "note: no gcc or no Python headers: the request path will run as pure Python"
  fi
fi

if [ -f "$PREFIX/$MARK" ]; then
  echo "upgrading the virtual environment $PREFIX"
elif [ -e "$PREFIX" ] && [ -n "$(ls -A "$PREFIX" 2>/dev/null)" ]; then
  die "$PREFIX exists and is not a virtual environment this script made: give an empty or new --prefix"
else
  run "$PY" -m venv "$PREFIX"
  [ "$DRY" = 1 ] || echo "made by scripts/install.sh; --uninstall removes this directory" > "$PREFIX/$MARK"
fi
PIP=(pip install --quiet --disable-pip-version-check)
# from a copy: pip builds in the source tree otherwise, and it may be read-only
BUILD=$(mktemp -d); trap 'rm -rf "$BUILD"' EXIT
if [ "$DRY" = 0 ]; then
  (cd "$SRC" && tar --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./demo-run \
    --exclude='*.so' --exclude=./supervisord_llm/_native.json -cf - .) | tar -C "$BUILD" -xf -
fi
run "$PREFIX/bin/python" -m "${PIP[@]}" --upgrade "$BUILD"
[ "$DRY" = 1 ] || echo "request path: $("$PREFIX/bin/python" -c \
  'from supervisord_llm import native as n; print(n.WHY)')"
run mkdir -p "$BINDIR"
for b in llm-supervisor llmctl; do
  run ln -sfn "$PREFIX/bin/$b" "$BINDIR/$b"
done

getent group "$GROUP_NAME" >/dev/null || run groupadd --system "$GROUP_NAME"
if ! getent passwd "$USER_NAME" >/dev/null; then
  # a home of its own: model servers keep caches under ~/.cache (Hugging Face, vLLM)
  if getent group "$USER_NAME" >/dev/null; then ugroup=(-g "$USER_NAME"); else ugroup=(--user-group); fi
  run useradd --system --create-home --home-dir /var/lib/llm --shell /usr/sbin/nologin \
    "${ugroup[@]}" "$USER_NAME"
fi

run install -d -m 0755 "$ETC"
if [ -e "$ETC/config.toml" ]; then
  echo "keeping $ETC/config.toml (never overwritten)"
else
  run install -m 0640 -o root -g "$GROUP_NAME" "$SRC/config.toml.example" "$ETC/config.toml"
fi
if [ -e "$DOCDIR" ] && [ ! -f "$DOCDIR/$MARK" ] && [ -n "$(ls -A "$DOCDIR" 2>/dev/null)" ]; then
  die "$DOCDIR exists and was not made by this script: give an empty or new --doc-dir"
fi
run install -d -m 0755 "$DOCDIR"
[ "$DRY" = 1 ] || echo "made by scripts/install.sh" > "$DOCDIR/$MARK"
run install -m 0644 "$SRC/README.md" "$SRC/config.toml.example" "$DOCDIR/"
run cp -r "$SRC/docs/." "$DOCDIR/"

# the audit log's directory, and its rotation (a reload makes the daemon open the file again)
run install -d -m 0750 -o root -g "$GROUP_NAME" "$LOGDIR"
run install -d -m 0755 "$LOGROTATE"
echo "+ write $LOGROTATE/llm-supervisor ($LOGDIR/*.log, daily)"
if [ "$DRY" = 0 ]; then
  sed -e "s|/var/log/llm-supervisor|$LOGDIR|g" -e "s|llm-admin|$GROUP_NAME|" \
    "$SRC/units/llm-supervisor.logrotate" > "$LOGROTATE/.llm-supervisor.new"
  chmod 0644 "$LOGROTATE/.llm-supervisor.new"
  mv -f "$LOGROTATE/.llm-supervisor.new" "$LOGROTATE/llm-supervisor"
fi

run install -d -m 0755 "$UNITDIR"
echo "+ write $UNITDIR/$UNIT (ExecStart=$PREFIX/bin/llm-supervisor --config $ETC/config.toml)"
if [ "$DRY" = 0 ]; then
  sed -e "s|^ExecStart=.*|ExecStart=$PREFIX/bin/llm-supervisor --config $ETC/config.toml|" \
      -e "s|^Documentation=.*|Documentation=file://$DOCDIR/README.md file://$DOCDIR/operations.md|" \
      "$SRC/units/$UNIT" > "$UNITDIR/.$UNIT.new"
  chmod 0644 "$UNITDIR/.$UNIT.new"
  mv -f "$UNITDIR/.$UNIT.new" "$UNITDIR/$UNIT"
fi
if command -v systemd-analyze >/dev/null && [ "$DRY" = 0 ]; then
  # only this unit's own problems count (the box's other units are not ours to judge)
  if ! out=$(systemd-analyze verify "$UNITDIR/$UNIT" 2>&1); then
    echo "$out" >&2; die "systemd-analyze verify $UNITDIR/$UNIT failed"
  fi
  [ -z "$out" ] || echo "$out"
fi
# the config is checked before anything starts or restarts on it
echo "+ $PREFIX/bin/llm-supervisor --config $ETC/config.toml --check"
CHECKED=1
if [ "$DRY" = 0 ]; then
  if "$PREFIX/bin/llm-supervisor" --config "$ETC/config.toml" --check >/dev/null 2>"$BUILD/check"
  then
    echo "configuration $ETC/config.toml: ok"
  else
    CHECKED=0
    sed 's/^/  /' "$BUILD/check" >&2
    echo "install.sh: installed, but $ETC/config.toml does not pass --check yet: edit it," \
      "then \`llm-supervisor --config $ETC/config.toml --check\` and" \
      "\`systemctl restart llm-supervisor\` (nothing was started or restarted)" >&2
  fi
fi
if have_systemd; then
  sctl daemon-reload
  sctl enable "$UNIT"
  if active; then
    if [ "$RESTART" = 1 ] && [ "$CHECKED" = 1 ]; then
      sctl restart "$UNIT"
    else
      echo "llm-supervisor is running the previous version; \`systemctl restart llm-supervisor\`"
      echo "switches to this one (its services restart; a hot swap is not possible across it)"
    fi
  elif [ "$START" = 1 ] && [ "$CHECKED" = 1 ]; then
    sctl start "$UNIT"
  fi
elif [ "$DRY" = 1 ]; then
  echo "+ $SYSTEMCTL daemon-reload; $SYSTEMCTL enable $UNIT (where systemd runs)"
else
  echo "systemd is not running here: the unit is installed, enable it where systemd runs"
fi
if [ "$DRY" = 1 ]; then
  echo "dry run: nothing was changed"
else
  echo "llm-supervisor $("$PREFIX/bin/python" -c 'import supervisord_llm as s; print(s.__version__)') installed in $PREFIX"
fi
