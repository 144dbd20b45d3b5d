#!/bin/sh
# restore-drill.sh: rehearse restoring vmsync backup copies, and prove it.
#
# A backup nobody has restored is a hope, not a backup. Run this monthly
# from the timer next to it (examples/systemd/vmsync-drill.timer). For each
# backup copy it:
#   1. restores the copy with vmsync into a fresh scratch directory: a local
#      copy (the drill runs on the backup host) or [user@]host:/path, pulled
#      over ssh the way a real restore would be;
#   2. verifies the restored file three ways:
#      - vmsync --check against the copy: the restore reproduced the copy;
#      - sha256sum against the digest recorded when the copy was made
#        (restore-drill.sh --record, run right after each backup): the copy
#        has not changed since (bit rot, a bad disk, tampering). The live
#        source has moved on since the backup, so its digest today proves
#        nothing about the copy. The record is the source's digest as of the
#        backup: of the source (snapshot) just sent, where the backup job
#        pushes (--from), or of the fresh copy where it pulls, since a sync
#        that exited 0 wrote exactly what it read;
#      - qemu-img check when the image is qcow2 (by its magic bytes): the
#        image is usable, not only intact;
#   3. removes the scratch directory, also on failure or a signal;
#   4. records the outcome in a Prometheus textfile (VMSYNC_DRILL_METRICS)
#      for node_exporter, one series per copy, replaced atomically.
#
# Usage:
#   restore-drill.sh [COPY...]               drill these (default: the settings)
#   restore-drill.sh --record [--force] COPY...
#       record the digest of each local COPY, right after a successful pull;
#   restore-drill.sh --record [--force] --from SRC COPY
#       record SRC's digest as COPY's (COPY as the drill will name it, e.g.
#       backup@host:/srv/images/db.raw), right after pushing SRC there.
#   A record is skipped when it still matches the file's size and mtime,
#   which a sync leaves alone when the source did not change; a copy
#   damaged behind vmsync's back keeps them too, so its good digest is kept.
#   --force re-records (after repairing a copy with vmsync -c, say).
#   The records stay on the host that runs the drill.
#
# Exit status: 0 when every drill passed (or every digest was recorded),
# 1 when any failed (after trying all), 2 for a bad setting or usage.
# Per copy, vmsync_drill_last_exit_code says what failed:
#   0 passed; 1 the restored data differs (from the recorded digest or from
#   the copy); 3-9, 23, 127 the vmsync restore failed with that exit code;
#   10 no usable digest record (missing, or the copy changed since it was
#   recorded) while VMSYNC_DRILL_REQUIRE_DIGEST=1; 11 qemu-img check found
#   errors or could not run.
#
# Every setting below can be overridden from the environment.

set -eu

# ---- Settings --------------------------------------------------------------

# Backup copies to drill, one per line: a path on this host, or
# [user@]host:/path on the backup host. The string is also the metrics'
# destination label: write it as the backup job's vmsync writes its
# destination operand, so alerts can join the two.
: "${VMSYNC_DRILL_COPIES:=/srv/images/db.raw}"
# Or a file listing them, one per line ('#' comments); replaces the above.
: "${VMSYNC_DRILL_COPY_LIST:=}"
# Where restores go; each run makes (and removes) its own directory in it.
# It needs room for the largest copy.
: "${VMSYNC_DRILL_SCRATCH:=/var/tmp/vmsync-drill}"
# Digest records: DIGESTS/<copy's absolute path>.sha256, and
# DIGESTS/<[user@]host>/<path>.sha256 for a remote copy.
: "${VMSYNC_DRILL_DIGESTS:=/var/lib/vmsync/digests}"
# 1: a copy without a usable record fails the drill (exit code 10);
# 0: it is verified against the copy and qemu-img only, with a warning.
: "${VMSYNC_DRILL_REQUIRE_DIGEST:=1}"
# node_exporter textfile (its own file, not vmsync's); empty: none.
: "${VMSYNC_DRILL_METRICS=/var/lib/prometheus/node-exporter/vmsync-drill.prom}"
# qemu-img for qcow2 copies; empty: do not check images.
: "${VMSYNC_DRILL_QEMU_IMG=qemu-img}"
# As in nightly-backup.sh: the binary, ssh for remote copies, limits.
: "${VMSYNC_BIN:=vmsync}"
: "${VMSYNC_SSH:=ssh -o BatchMode=yes}"
: "${VMSYNC_SSH_KEY=}"
: "${VMSYNC_TIMEOUT:=600}"
: "${VMSYNC_BWLIMIT=}"
# 1: also log through logger(1) (tag vmsync-drill); 0: stderr only.
: "${VMSYNC_SYSLOG:=1}"

PATH="$PATH:/usr/local/sbin:/usr/local/bin"
export PATH

# ---- Helpers ---------------------------------------------------------------

log() {
    printf '%s: %s: %s\n' "${0##*/}" "$1" "$2" >&2
    if [ "$VMSYNC_SYSLOG" != 0 ] && command -v logger >/dev/null 2>&1; then
        logger -t vmsync-drill -p "user.$1" -- "$2" 2>/dev/null || :
    fi
}

# Success goes to syslog (or, with VMSYNC_SYSLOG=0, to stdout: the journal
# under systemd); a passing drill under cron mails nothing.
info() {
    if [ "$VMSYNC_SYSLOG" = 0 ]; then
        printf '%s: %s\n' "${0##*/}" "$1"
    elif command -v logger >/dev/null 2>&1; then
        logger -t vmsync-drill -p user.info -- "$1" 2>/dev/null || :
    fi
}

die() {
    log err "$1"
    exit 2
}

# Seconds since the epoch, with nanoseconds where date(1) has them.
now() {
    t=$(date +%s.%N)
    case "$t" in
        *N*) date +%s ;;
        *) printf '%s\n' "$t" ;;
    esac
}

# Non-blank, non-comment lines of the copies list.
list_copies() {
    if [ -n "$VMSYNC_DRILL_COPY_LIST" ]; then
        [ -r "$VMSYNC_DRILL_COPY_LIST" ] || die "cannot read VMSYNC_DRILL_COPY_LIST $VMSYNC_DRILL_COPY_LIST"
        cat -- "$VMSYNC_DRILL_COPY_LIST"
    else
        printf '%s\n' "$VMSYNC_DRILL_COPIES"
    fi | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e '/^#/d' -e '/^$/d'
}

# split_operand OPERAND: sets host and path as vmsync reads the operand:
# remote when a ':' comes before any '/' ([addr]:path for IPv6).
split_operand() {
    host=
    path=$1
    case "$1" in
        \[*\]:* | *@\[*\]:*)
            host="${1%%]:*}]"
            path=${1#*]:}
            ;;
        *:*)
            case "${1%%:*}" in
                */*) ;;
                *) host=${1%%:*}; path=${1#*:} ;;
            esac
            ;;
    esac
}

# The copy as a Prometheus label value (backslash and quote escaped).
label() {
    printf '%s\n' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'
}

# record_path COPY: where COPY's digest record is.
record_path() {
    split_operand "$1"
    printf '%s%s%s.sha256\n' "${VMSYNC_DRILL_DIGESTS%/}" "${host:+/$host}" "$path"
}

# field FILE KEY: the value of "KEY value" in a record.
field() {
    sed -n "s/^$2 //p" "$1" | head -n 1
}

# size_mtime FILE: "SIZE MTIME", the mtime with nanoseconds: what vmsync
# keeps equal to the source's and its quick check compares.
size_mtime() {
    stat -c '%s %.9Y' -- "$1"
}

# ---- --record --------------------------------------------------------------

# record_one FILE COPY: FILE's digest as COPY's record.
record_one() {
    file=$1
    copy=$2
    split_operand "$copy"
    rec=$(record_path "$copy")
    case "$file" in
        /*) ;;
        *) log err "$file: --record takes absolute paths of local files"; return 1 ;;
    esac
    case "$path" in
        /*) ;;
        *) log err "$copy: give the copy's absolute path"; return 1 ;;
    esac
    [ -f "$file" ] || { log err "$file: no such file"; return 1; }
    before=$(size_mtime "$file")
    if [ "$force" = 0 ] && [ -f "$rec" ] &&
        [ "$(field "$rec" size) $(field "$rec" mtime)" = "$before" ]; then
        return 0
    fi
    sum=$(sha256sum <"$file" | sed 's/ .*//')
    # A sync that replaced the file meanwhile would make a record of neither.
    if [ "$(size_mtime "$file")" != "$before" ]; then
        log err "$file: changed while its digest was computed; not recorded"
        return 1
    fi
    mkdir -p -- "${rec%/*}"
    tmp="$rec.tmp.$$"
    {
        echo "# vmsync restore-drill digest record, format 1"
        echo "sha256 $sum"
        echo "size ${before% *}"
        echo "mtime ${before#* }"
        echo "recorded $(date +%s)"
    } >"$tmp"
    mv -f -- "$tmp" "$rec"
}

if [ "${1:-}" = --record ]; then
    shift
    force=0
    if [ "${1:-}" = --force ]; then
        force=1
        shift
    fi
    if [ "${1:-}" = --from ]; then
        [ "$#" = 3 ] || die "usage: ${0##*/} --record [--force] --from SRC COPY"
        record_one "$2" "$3" || exit 1
        exit 0
    fi
    [ "$#" -gt 0 ] || die "--record needs the copies' paths"
    failed=0
    for copy in "$@"; do
        record_one "$copy" "$copy" || failed=$((failed + 1))
    done
    [ "$failed" = 0 ] || exit 1
    exit 0
fi
case "${1:-}" in
    -*) die "unknown option $1 (usage: ${0##*/} [COPY...] | --record [--force] [--from SRC] COPY...)" ;;
esac

# ---- Settings check --------------------------------------------------------

case "$VMSYNC_TIMEOUT" in
    '' | *[!0-9]*) die "VMSYNC_TIMEOUT must be a number of seconds, not '$VMSYNC_TIMEOUT'" ;;
esac
case "$VMSYNC_DRILL_REQUIRE_DIGEST" in
    0 | 1) ;;
    *) die "VMSYNC_DRILL_REQUIRE_DIGEST must be 0 or 1" ;;
esac
command -v "$VMSYNC_BIN" >/dev/null 2>&1 || die "$VMSYNC_BIN: not found (set VMSYNC_BIN)"
mkdir -p -- "$VMSYNC_DRILL_SCRATCH" || die "cannot create VMSYNC_DRILL_SCRATCH $VMSYNC_DRILL_SCRATCH"

rsh=$VMSYNC_SSH
if [ -n "$VMSYNC_SSH_KEY" ]; then
    case "$VMSYNC_SSH_KEY" in
        *"'"*) die "VMSYNC_SSH_KEY must not contain a single quote" ;;
    esac
    rsh="$rsh -o IdentitiesOnly=yes -i '$VMSYNC_SSH_KEY'"
fi

# ---- Scratch space ---------------------------------------------------------

scratch=
cleanup() {
    if [ -n "$scratch" ]; then
        rm -rf -- "$scratch"
    fi
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM
scratch=$(mktemp -d "${VMSYNC_DRILL_SCRATCH%/}/drill.XXXXXX") ||
    die "cannot make a scratch directory in $VMSYNC_DRILL_SCRATCH"
# The restores' manifest cache entries are as short-lived as the restores.
VMSYNC_CACHE_DIR="$scratch/cache"
export VMSYNC_CACHE_DIR
results="$scratch/results"
: >"$results"

# vmsync_get SRC DEST: one quiet restore (a pull when SRC is remote).
vmsync_get() {
    set -- -q --timeout "$VMSYNC_TIMEOUT" -e "$rsh" -- "$1" "$2"
    if [ -n "$VMSYNC_BWLIMIT" ]; then
        set -- --bwlimit "$VMSYNC_BWLIMIT" "$@"
    fi
    "$VMSYNC_BIN" "$@"
}

# ---- One drill -------------------------------------------------------------

# drill_one COPY: restore, verify, clean up; appends a line to $results.
drill_one() {
    copy=$1
    start=$(now)
    code=0
    bytes=0
    dir="$scratch/restore"
    rm -rf -- "$dir"
    mkdir -- "$dir"
    restored="$dir/${copy##*/}"
    split_operand "$copy"
    case "$path" in
        /*) ;;
        *) log err "$copy: give the copy's absolute path"; code=2 ;;
    esac

    # 1. The restore itself, as an admin would run it.
    if [ "$code" = 0 ]; then
        vmsync_get "$copy" "$restored" || code=$?
        if [ "$code" != 0 ]; then
            log err "$copy: restore failed with vmsync exit $code"
        else
            bytes=$(stat -c %s -- "$restored")
        fi
    fi

    # 2a. The restore reproduced the copy as it is now.
    if [ "$code" = 0 ]; then
        crc=0
        "$VMSYNC_BIN" -q --check --timeout "$VMSYNC_TIMEOUT" -e "$rsh" -- "$copy" "$restored" || crc=$?
        case "$crc" in
            0) ;;
            1) log err "$copy: the restored file differs from the copy (vmsync --check): the restore is broken"; code=1 ;;
            *) log err "$copy: vmsync --check of the restore failed with exit $crc"; code=$crc ;;
        esac
    fi

    # 2b. The copy is what the backup wrote: its digest as recorded then.
    if [ "$code" = 0 ]; then
        rec=$(record_path "$copy")
        why=
        if [ ! -s "$rec" ]; then
            why="no digest recorded (run ${0##*/} --record after each backup)"
        elif [ "$(field "$rec" size) $(field "$rec" mtime)" != "$(size_mtime "$restored")" ]; then
            why="the copy changed since its digest was recorded (a later backup did not record it)"
        fi
        if [ -n "$why" ]; then
            if [ "$VMSYNC_DRILL_REQUIRE_DIGEST" = 1 ]; then
                log err "$copy: $why"
                code=10
            else
                log warning "$copy: $why; verified against the copy only"
            fi
        else
            sum=$(sha256sum <"$restored" | sed 's/ .*//')
            if [ "$sum" != "$(field "$rec" sha256)" ]; then
                log err "$copy: sha256 $sum differs from the digest recorded at backup time ($(field "$rec" sha256)): the copy was damaged after it was made"
                code=1
            fi
        fi
    fi

    # 2c. A qcow2 image is consistent (qemu-img check: 0 clean, 3 only
    # leaked clusters, which waste space but lose nothing).
    if [ "$code" = 0 ] && [ -n "$VMSYNC_DRILL_QEMU_IMG" ] &&
        [ "$(od -An -tx1 -N4 -- "$restored" | tr -d ' \n')" = 514649fb ]; then
        qrc=0
        out=$("$VMSYNC_DRILL_QEMU_IMG" check -f qcow2 -- "$restored" 2>&1) || qrc=$?
        case "$qrc" in
            0 | 3) ;;
            *)
                log err "$copy: qemu-img check exited $qrc: $(printf '%s\n' "$out" | sed -n '/./p' | head -n 3 | tr '\n' ' ')"
                code=11
                ;;
        esac
    fi

    rm -rf -- "$dir"
    end=$(now)
    if [ "$code" = 0 ]; then
        info "$copy: restored and verified ($bytes bytes)"
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$(label "$copy")" "$end" "$code" \
        "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')" "$bytes" >>"$results"
    [ "$code" = 0 ]
}

# ---- Metrics ---------------------------------------------------------------

# Merges $results into the textfile: series of the copies drilled now are
# replaced (a failure keeps the copy's last success time), all others kept.
write_metrics() {
    file=$VMSYNC_DRILL_METRICS
    mdir=$(dirname -- "$file")
    [ -d "$mdir" ] || { log err "metrics directory $mdir does not exist"; return 1; }
    # Serialise concurrent drills' read-merge-write, as vmsync does for its file.
    if command -v flock >/dev/null 2>&1; then
        exec 9>>"$file.lock"
        flock 9
    fi
    tmp="$mdir/.${file##*/}.$$.tmp"
    old=$file
    [ -f "$old" ] || old=/dev/null
    awk -F '\t' -v old="$old" '
        BEGIN {
            n = split("last_run_timestamp_seconds last_success_timestamp_seconds last_exit_code duration_seconds restored_bytes", fam, " ")
            help["last_run_timestamp_seconds"] = "End time of the last restore drill of this backup copy, in seconds since the epoch."
            help["last_success_timestamp_seconds"] = "End time of the last restore drill of this backup copy that passed, in seconds since the epoch."
            help["last_exit_code"] = "Outcome of the last restore drill of this backup copy: 0 passed (see restore-drill.sh for the others)."
            help["duration_seconds"] = "Duration of the last restore drill of this backup copy, in seconds."
            help["restored_bytes"] = "Bytes restored by the last restore drill of this backup copy."
            # The old file: lines we wrote, name{destination="..."} value.
            while ((getline line < old) > 0) {
                if (line !~ /^vmsync_drill_[a-z_]+[{]destination=".*"[}] [^ ]+$/) continue
                name = substr(line, 14, index(line, "{") - 14)
                rest = substr(line, index(line, "{") + 14)
                sp = match(rest, /"[}] [^ ]+$/)
                d = substr(rest, 1, sp - 1)
                val[d, name] = substr(rest, sp + 3)
                dests[d] = 1
            }
        }
        {
            d = $1
            dests[d] = 1
            val[d, "last_run_timestamp_seconds"] = $2
            val[d, "last_exit_code"] = $3
            val[d, "duration_seconds"] = $4
            val[d, "restored_bytes"] = $5
            if ($3 == 0) val[d, "last_success_timestamp_seconds"] = $2
        }
        END {
            m = 0
            for (d in dests) list[++m] = d
            # Sorted, so the same results give the same bytes.
            for (i = 2; i <= m; i++) {
                x = list[i]
                for (j = i - 1; j >= 1 && list[j] > x; j--) list[j + 1] = list[j]
                list[j + 1] = x
            }
            for (f = 1; f <= n; f++) {
                name = fam[f]
                any = 0
                for (i = 1; i <= m; i++) if ((list[i], name) in val) any = 1
                if (!any) continue
                print "# HELP vmsync_drill_" name " " help[name]
                print "# TYPE vmsync_drill_" name " gauge"
                for (i = 1; i <= m; i++)
                    if ((list[i], name) in val)
                        print "vmsync_drill_" name "{destination=\"" list[i] "\"} " val[list[i], name]
            }
        }
    ' "$results" >"$tmp" && chmod 0644 "$tmp" && mv -f -- "$tmp" "$file" || {
        rm -f -- "$tmp"
        log err "cannot write the metrics file $file"
        return 1
    }
}

# ---- Work ------------------------------------------------------------------

if [ "$#" -gt 0 ]; then
    copies=$(printf '%s\n' "$@")
else
    copies=$(list_copies)
fi
[ -n "$copies" ] || die "no copies to drill (VMSYNC_DRILL_COPIES / VMSYNC_DRILL_COPY_LIST)"

count=0
failed=0
set -f
old_ifs=$IFS
IFS='
'
for copy in $copies; do
    IFS=$old_ifs
    count=$((count + 1))
    drill_one "$copy" || failed=$((failed + 1))
done
IFS=$old_ifs
set +f

if [ -n "$VMSYNC_DRILL_METRICS" ]; then
    write_metrics || failed=$((failed + 1))
fi
if [ "$failed" -gt 0 ]; then
    log err "$failed of $count restore drill(s) failed; see the messages above"
    exit 1
fi
exit 0
