#!/bin/sh
# nightly-backup.sh: push VM disk images to a backup host with vmsync.
#
# Run it nightly from cron or from the systemd timer next to it
# (examples/systemd/). For each image it:
#   1. (optionally) freezes the image with a snapshot: see snapshot_begin;
#   2. runs  vmsync -q --timeout 600 --metrics-file METRICS -e SSH SRC DEST
#      which sends only the chunks that changed since last night;
#   3. on the check day (Sunday by default) also runs  vmsync --check --json
#      on the same source, which reads both copies in full, and logs the result
#      (with the differing byte count if any) through logger(1); the check
#      records its outcome in METRICS too, as mode="check".
#
# Exit status: 0 when every image was backed up (and checked, on check days);
# 1 when any image failed or its check found differences, after trying every
# image, so cron mails the admin (errors are printed on stderr) and a systemd
# service ends up "failed"; 2 for a mistake in the settings below.
# A vmsync exit 8 (the destination is locked: last night's run of that image
# is still going) is a warning, not a failure.
#
# Every setting below can be overridden from the environment, e.g.
#   VMSYNC_DEST=backup@nas:/srv/images/ ./nightly-backup.sh

set -eu

# ---- Settings --------------------------------------------------------------

# Images to back up, one path per line (paths may contain spaces, not newlines).
: "${VMSYNC_IMAGES:=/var/lib/libvirt/images/web.qcow2
/var/lib/libvirt/images/db.raw}"
# Or a file listing them, one per line; blank lines and '#' comments are
# skipped. When set, it replaces VMSYNC_IMAGES.
: "${VMSYNC_IMAGE_LIST:=}"
# Where they go: [user@]host:dir/ (or a local directory). Each image is written
# as DIR/<its file name>, so two images must not share a file name.
: "${VMSYNC_DEST:=backup@backup.example.org:/srv/images/}"
# Prometheus node_exporter textfile collector file, written by vmsync itself
# (it keeps only vmsync's series: give it a file of its own); empty: none.
: "${VMSYNC_METRICS=/var/lib/prometheus/node-exporter/vmsync.prom}"
# SSH private key allowed on the backup host (examples/authorized_keys.example);
# empty: ssh's defaults.
: "${VMSYNC_SSH_KEY=/root/.ssh/vmsync_backup_ed25519}"
# The ssh command (vmsync -e). BatchMode: fail instead of prompting.
: "${VMSYNC_SSH:=ssh -o BatchMode=yes}"
# The vmsync binary here, and on the backup host (empty: 'vmsync' in its PATH).
: "${VMSYNC_BIN:=vmsync}"
: "${VMSYNC_REMOTE_PATH=}"
# Give up on a peer that has been silent this many seconds (vmsync exit 4).
: "${VMSYNC_TIMEOUT:=600}"
# Bandwidth limit on the wire, as rsync writes it: 50M is 50 MiB/s, a bare
# number is KiB/s; empty: unlimited.
: "${VMSYNC_BWLIMIT=}"
# Comparison after the sync: weekly (in full, on VMSYNC_CHECK_DAY), sampled
# (every night one seventh of each image, --sample DAY/7, so each byte is
# checked once a week without a full read on any night), always (in full),
# never.
: "${VMSYNC_CHECK:=weekly}"
# ISO day of the week for the weekly check: 1 = Monday ... 7 = Sunday.
: "${VMSYNC_CHECK_DAY:=7}"
# 1: also send messages to syslog with logger(1) (tag vmsync-backup);
# 0: stderr only (under systemd, stderr already goes to the journal).
: "${VMSYNC_SYSLOG:=1}"

# cron's PATH is short; vmsync is often installed under /usr/local.
PATH="$PATH:/usr/local/sbin:/usr/local/bin"
export PATH

# ---- Helpers ---------------------------------------------------------------

# log PRIORITY MESSAGE: to stderr, and to syslog unless VMSYNC_SYSLOG=0.
log() {
    printf '%s: %s: %s\n' "${0##*/}" "$1" "$2" >&2
    if [ "$VMSYNC_SYSLOG" != 0 ] && command -v logger >/dev/null 2>&1; then
        # A host without a syslog socket must not turn a backup into a failure.
        logger -t vmsync-backup -p "user.$1" -- "$2" 2>/dev/null || :
    fi
}

# info goes to syslog only: a successful night prints nothing, so cron
# sends no mail.
info() {
    if [ "$VMSYNC_SYSLOG" != 0 ] && command -v logger >/dev/null 2>&1; then
        logger -t vmsync-backup -p user.info -- "$1" 2>/dev/null || :
    fi
}

die() {
    log err "$1"
    exit 2
}

# The meaning of a vmsync exit code, for messages.
explain() {
    case "$1" in
        1) echo "the copies differ" ;;
        2) echo "usage error (bad arguments)" ;;
        3) echo "local I/O error (source unreadable, destination not writable, disk full)" ;;
        4) echo "connection failed or the peer was silent for ${VMSYNC_TIMEOUT}s" ;;
        5) echo "protocol error" ;;
        6) echo "--verify mismatch" ;;
        7) echo "the source changed while it was read (sync from a snapshot)" ;;
        8) echo "destination locked by another vmsync (last night's run still going?)" ;;
        127) echo "$VMSYNC_BIN not found" ;;
        129 | 130 | 143) echo "interrupted by a signal" ;;
        *) echo "failed" ;;
    esac
}

# The images, one per line, without blank lines or comments.
list_images() {
    if [ -n "$VMSYNC_IMAGE_LIST" ]; then
        [ -r "$VMSYNC_IMAGE_LIST" ] || die "cannot read VMSYNC_IMAGE_LIST $VMSYNC_IMAGE_LIST"
        sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e '/^#/d' -e '/^$/d' \
            <"$VMSYNC_IMAGE_LIST"
    else
        printf '%s\n' "$VMSYNC_IMAGES" | sed -e 's/^[[:space:]]*//' \
            -e 's/[[:space:]]*$//' -e '/^#/d' -e '/^$/d'
    fi
}

# snapshot_begin IMAGE: prints the path vmsync should read for IMAGE.
#
# vmsync reads a source once and exits 7 if it changed meanwhile (size, mtime
# or ctime moved), so the image of a running VM must be read from something
# that holds still. As shipped it returns IMAGE itself: right for VMs that are
# shut down at night. For running VMs, pick one of these (and undo it in
# snapshot_end):
#
#   qemu/libvirt: divert the guest's writes to an overlay; the base image is
#   then unchanging and can be read in place (--quiesce needs the
#   qemu-guest-agent in the guest; drop it for a crash-consistent copy):
#       dom=$(basename "$1" | sed 's/\.[^.]*$//')      # your naming scheme
#       virsh snapshot-create-as --domain "$dom" --name vmsync-nightly \
#           --disk-only --atomic --no-metadata --quiesce >&2
#       printf '%s\n' "$1"
#
#   LVM: the images live on a filesystem on an LV: snapshot the LV, mount the
#   snapshot read-only, read the image from there:
#       lvcreate --snapshot --size 10G --name images-vmsync vg0/images >&2
#       mount -o ro /dev/vg0/images-vmsync /mnt/vmsync-snap >&2
#       printf '%s\n' "/mnt/vmsync-snap/${1##*/}"
#
# (vmsync reads regular files only, not the block device of an LV-backed VM.)
# The destination name always comes from IMAGE, never from the snapshot path.
snapshot_begin() {
    printf '%s\n' "$1"
}

# snapshot_end IMAGE: undoes snapshot_begin, whether or not the sync worked.
#   qemu/libvirt: merge the overlay back and switch the guest to the base
#   (snapshot_begin ran in a subshell: derive dom from IMAGE again):
#       dom=$(basename "$1" | sed 's/\.[^.]*$//')
#       virsh blockcommit "$dom" vda --active --pivot
#       (then delete the overlay file virsh created next to the image)
#   LVM:
#       umount /mnt/vmsync-snap && lvremove -y vg0/images-vmsync
snapshot_end() {
    :
}

# ---- Settings check --------------------------------------------------------

case "$VMSYNC_CHECK" in
    weekly | sampled | always | never) ;;
    *) die "VMSYNC_CHECK must be weekly, sampled, always or never, not '$VMSYNC_CHECK'" ;;
esac
case "$VMSYNC_CHECK_DAY" in
    [1-7]) ;;
    *) die "VMSYNC_CHECK_DAY must be 1 (Monday) to 7 (Sunday), not '$VMSYNC_CHECK_DAY'" ;;
esac
case "$VMSYNC_TIMEOUT" in
    '' | *[!0-9]*) die "VMSYNC_TIMEOUT must be a number of seconds, not '$VMSYNC_TIMEOUT'" ;;
esac
[ -n "$VMSYNC_DEST" ] || die "VMSYNC_DEST is empty"
command -v "$VMSYNC_BIN" >/dev/null 2>&1 || die "$VMSYNC_BIN: not found (set VMSYNC_BIN)"

# The remote shell for vmsync -e, which splits it on blanks and honours
# single quotes: the key path is quoted, so it may contain spaces.
rsh=$VMSYNC_SSH
if [ -n "$VMSYNC_SSH_KEY" ]; then
    case "$VMSYNC_SSH_KEY" in
        *"'"*) die "VMSYNC_SSH_KEY must not contain a single quote" ;;
    esac
    [ -r "$VMSYNC_SSH_KEY" ] || die "cannot read the ssh key $VMSYNC_SSH_KEY"
    rsh="$rsh -o IdentitiesOnly=yes -i '$VMSYNC_SSH_KEY'"
fi

check_today=no
sample=
case "$VMSYNC_CHECK" in
    always) check_today=yes ;;
    sampled) check_today=yes; sample="$(date +%u)/7" ;;
    weekly) if [ "$(date +%u)" = "$VMSYNC_CHECK_DAY" ]; then check_today=yes; fi ;;
esac

# ---- Work ------------------------------------------------------------------

failed=0    # images that failed (sync or check)
locked=0    # images skipped because another vmsync held the destination

# backup_one IMAGE DEST: sync IMAGE to DEST, then check it on check days.
backup_one() {
    img=$1
    dest=$2

    if [ ! -f "$img" ]; then
        log err "$img: no such file; not backed up"
        failed=$((failed + 1))
        return 0
    fi

    src=$(snapshot_begin "$img") || {
        log err "$img: taking the snapshot failed; not backed up"
        failed=$((failed + 1))
        return 0
    }

    # Options shared by the sync and the check.
    set -- -q --timeout "$VMSYNC_TIMEOUT" -e "$rsh"
    if [ -n "$VMSYNC_REMOTE_PATH" ]; then
        set -- "$@" --remote-path "$VMSYNC_REMOTE_PATH"
    fi
    if [ -n "$VMSYNC_BWLIMIT" ]; then
        set -- "$@" --bwlimit "$VMSYNC_BWLIMIT"
    fi
    # Sync and check runs are separate series in the file (label mode="sync"
    # or mode="check"), each keyed by the destination.
    if [ -n "$VMSYNC_METRICS" ]; then
        set -- "$@" --metrics-file "$VMSYNC_METRICS"
    fi

    rc=0
    "$VMSYNC_BIN" "$@" -- "$src" "$dest" || rc=$?
    case "$rc" in
        0)
            info "$img: synced to $dest"
            ;;
        8)
            log warning "$img: skipped, $(explain 8)"
            locked=$((locked + 1))
            ;;
        *)
            log err "$img: sync to $dest failed with exit $rc: $(explain "$rc")"
            failed=$((failed + 1))
            ;;
    esac

    # The check reads the same (snapshot) source, before it is released:
    # a live image would differ from last night's copy by design.
    if [ "$rc" = 0 ] && [ "$check_today" = yes ]; then
        crc=0
        if [ -n "$sample" ]; then
            json=$("$VMSYNC_BIN" "$@" --check --sample "$sample" --json -- "$src" "$dest") || crc=$?
        else
            json=$("$VMSYNC_BIN" "$@" --check --json -- "$src" "$dest") || crc=$?
        fi
        case "$crc" in
            0)
                info "$img: check: $dest is identical"
                ;;
            1)
                bytes=$(printf '%s\n' "$json" |
                    sed -n 's/.*"differing_bytes": *\([0-9][0-9]*\).*/\1/p')
                ranges=$(printf '%s\n' "$json" |
                    sed -n 's/.*"difference_count": *\([0-9][0-9]*\).*/\1/p')
                log err "$img: check: $dest differs from the source in ${bytes:-?} bytes (${ranges:-?} ranges)"
                # The full report (with the first differing ranges), for the record.
                log err "$img: check: $json"
                failed=$((failed + 1))
                ;;
            8)
                log warning "$img: check skipped, $(explain 8)"
                locked=$((locked + 1))
                ;;
            *)
                log err "$img: check of $dest failed with exit $crc: $(explain "$crc")"
                failed=$((failed + 1))
                ;;
        esac
    fi

    snapshot_end "$img" || {
        log err "$img: releasing the snapshot failed; see snapshot_end"
        failed=$((failed + 1))
    }
    return 0
}

images=$(list_images)
[ -n "$images" ] || die "no images to back up (VMSYNC_IMAGES / VMSYNC_IMAGE_LIST)"

count=0
seen='
'
# One image per line: split on newlines only, and no globbing of the paths.
set -f
old_ifs=$IFS
IFS='
'
for img in $images; do
    IFS=$old_ifs
    count=$((count + 1))
    name=${img##*/}
    case "$seen" in
        *"
$name
"*)
            log err "$img: another image is also named $name; both would be written to one destination"
            failed=$((failed + 1))
            continue
            ;;
    esac
    seen="$seen$name
"
    case "$VMSYNC_DEST" in
        */ | *:) dest="$VMSYNC_DEST$name" ;;
        *) dest="$VMSYNC_DEST/$name" ;;
    esac
    backup_one "$img" "$dest"
done
IFS=$old_ifs
set +f

if [ "$failed" -gt 0 ]; then
    log err "$failed of $count image(s) failed; see the messages above"
    exit 1
fi
if [ "$locked" -gt 0 ]; then
    log warning "$locked image(s) skipped because a previous run still holds them; nothing failed"
fi
info "$count image(s) backed up to $VMSYNC_DEST"
exit 0
