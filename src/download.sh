#!/usr/bin/env bash
# Download the livedoor news corpus and extract it to data/text/<category>/<category>-<id>.txt.
#
# Usage (from the repository root):
#   bash src/download.sh                                 # download from rondhuit.com
#   bash src/download.sh PATH/TO/ldcc-20140209.tar.gz    # offline: use a local archive
#
# Environment:
#   LIVEDOOR_URL     download from this URL instead (a mirror).
#   LIVEDOOR_SHA256  expected SHA-256 of the archive instead of the published one
#                    (a mirror that repacked it, or tests).
#
# The archive is always checksum-verified before extraction. An interrupted download resumes
# on the next run (data/ldcc-20140209.tar.gz.part); a complete data/ldcc-20140209.tar.gz is
# kept and reused. data/text appears only once the whole corpus is extracted and checked, and
# a run with the corpus already in place does nothing.
set -euo pipefail

URL="${LIVEDOOR_URL:-https://www.rondhuit.com/download/ldcc-20140209.tar.gz}"
# Lower case, as sha256sum prints it (tr, not ${VAR,,}: macOS ships bash 3.2, and this script runs on it).
SHA256=$(printf '%s' "${LIVEDOOR_SHA256:-b17606ed8c670013a3809100a9e6104701baab62cc019abc262111bd2acf1063}" | tr '[:upper:]' '[:lower:]')
DATA_DIR=data
ARCHIVE="$DATA_DIR/ldcc-20140209.tar.gz"
CATEGORIES=(dokujo-tsushin it-life-hack kaden-channel livedoor-homme movie-enter
            peachy smax sports-watch topic-news)

die() { echo "download.sh: error: $*" >&2; exit 1; }
say() { echo "download.sh: $*"; }

# True when $1 holds exactly the 9 category folders, each with at least one article file
# (<category>-<id>.txt; LICENSE.txt alone does not count).
corpus_ok() {
  local dir=$1 cat
  [[ -d $dir ]] || return 1
  for cat in "${CATEGORIES[@]}"; do
    compgen -G "$dir/$cat/$cat-*.txt" >/dev/null || return 1
  done
  # "$dir/" so that a symlinked data/text is followed.
  [[ $(find "$dir/" -mindepth 1 -maxdepth 1 -type d | wc -l) -eq ${#CATEGORIES[@]} ]]
}

sha256_of() {
  # Read from stdin so that odd file names cannot change the output format.
  if command -v sha256sum >/dev/null; then
    sha256sum <"$1" | cut -d' ' -f1
  else
    shasum -a 256 <"$1" | cut -d' ' -f1
  fi
}

# verify FILE OWNED: on a mismatch, delete FILE only if this script downloaded it (OWNED=yes),
# so that a rerun fetches it again; a user's own archive is never deleted.
verify() {
  local file=$1 owned=$2 actual hint=""
  actual=$(sha256_of "$file")
  [[ $actual == "$SHA256" ]] && return 0
  if [[ $owned == yes ]]; then
    rm -f -- "$file"
    hint=" Deleted it so that a rerun downloads it again."
  fi
  die "checksum mismatch for $file: expected $SHA256, got $actual.$hint" \
      "If you trust this archive (e.g. from a mirror), set LIVEDOOR_SHA256=$actual."
}

download() {
  local part="$ARCHIVE.part"
  say "downloading $URL"
  # -C - / -c continue a .part left by an interrupted run instead of starting over.
  if command -v curl >/dev/null; then
    curl -fL --retry 3 -C - -o "$part" "$URL" || die "download of $URL failed (no network?)." \
      "Rerun to resume, or pass a local archive: bash src/download.sh PATH/TO/ldcc-20140209.tar.gz"
  elif command -v wget >/dev/null; then
    wget -c -O "$part" "$URL" || die "download of $URL failed (no network?)." \
      "Rerun to resume, or pass a local archive: bash src/download.sh PATH/TO/ldcc-20140209.tar.gz"
  else
    die "neither curl nor wget found. Install one, or pass a local archive:" \
        "bash src/download.sh PATH/TO/ldcc-20140209.tar.gz"
  fi
  [[ -s $part ]] || die "download of $URL produced no data"
  # Only a finished download gets the final name, so a reused archive is never a partial one.
  mv -- "$part" "$ARCHIVE"
}

usage() {
  # The header comment above is the usage text.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  usage
  exit 0
fi
if [[ $# -gt 1 ]]; then
  echo "download.sh: error: expected at most one argument (a local archive)." >&2
  usage >&2
  exit 2
fi

if corpus_ok "$DATA_DIR/text"; then
  say "corpus already in place at $DATA_DIR/text; nothing to do."
  exit 0
fi
# Never merge into or overwrite something we did not put there.
if [[ -e $DATA_DIR/text ]]; then
  die "$DATA_DIR/text exists but is not a complete corpus" \
      "(expected exactly the 9 category folders). Move or remove it and rerun."
fi

command -v sha256sum >/dev/null || command -v shasum >/dev/null \
  || die "neither sha256sum nor shasum found; one is needed to verify the archive."
mkdir -p "$DATA_DIR"

if [[ $# -eq 1 ]]; then
  archive=$1
  [[ -f $archive ]] || die "no such archive: $archive"
  say "using local archive $archive"
  verify "$archive" no
else
  archive=$ARCHIVE
  if [[ -f $archive ]]; then
    say "reusing $archive"
  else
    download
  fi
  verify "$archive" yes
fi

# Extract beside data/text (same file system, so the final mv is an atomic rename) and
# remove the temporary folder whatever happens.
tmp=""
cleanup() { if [[ -n $tmp ]]; then rm -rf -- "$tmp"; fi; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
tmp=$(mktemp -d "$DATA_DIR/.extract.XXXXXX")

say "extracting $archive"
tar -xzf "$archive" -C "$tmp" || die "could not extract $archive: corrupt or not a .tar.gz file."
corpus_ok "$tmp/text" || die "unexpected layout in $archive: expected text/ with exactly the" \
  "9 category folders (${CATEGORIES[*]}), each with article files."
mv -- "$tmp/text" "$DATA_DIR/text"
say "corpus ready at $DATA_DIR/text"
