#!/bin/sh
# bookgen-kit @VERSION@ (build @BUILD_ID@): a Python zipapp; the zip archive follows this
# POSIX shell preamble. Run it as ./bookgen-kit.pyz or sh bookgen-kit.pyz (this preamble
# picks the interpreter), or as python3 -I -S bookgen-kit.pyz (you pick it).
# The interpreter: $BOOKGEN_PYTHON if set; else the first of python3 @CANDIDATES@
# /usr/libexec/platform-python python that is a CPython this build has a full target for
# (@KNOWN@); else the first whose target goes without something (@PARTIAL@); else the
# first newer CPython (it runs with a warning). It runs as -I -S and records what was
# tried and why in BOOKGEN_KIT_LAUNCH (self-check --json shows it).
# No command but the interpreters themselves is run, so PATH may hold nothing else.
# CPython reads /etc/localtime as it starts (a FIFO planted there hangs it): with TZ
# unset, TZ=UTC0 (a rule, no file) is set for it, and the host's choice is recorded.
bk_tz=set
if [ -z "${TZ+x}" ]; then TZ=UTC0; export TZ; bk_tz=unset; fi
bk_probe='import sys; i = getattr(sys, "implementation", None); sys.stdout.write("%s-%d.%d" % (getattr(i, "name", "python"), sys.version_info[0], sys.version_info[1]))'
bk_nl='
'
bk_seen=' '
bk_tried=
bk_human=
bk_pick=
bk_newer=
bk_partial=
bk_why=
if [ -n "${BOOKGEN_PYTHON:-}" ]; then
  bk_pick=$BOOKGEN_PYTHON
  bk_why=BOOKGEN_PYTHON
else
  for bk_name in python3 @CANDIDATES@ /usr/libexec/platform-python python; do
    case $bk_name in
      /*) [ -x "$bk_name" ] || continue; bk_path=$bk_name ;;
      *) bk_path=$(command -v "$bk_name" 2>/dev/null) || continue ;;
    esac
    case $bk_path in /*) ;; *) continue ;; esac
    case $bk_seen in *" $bk_path "*) continue ;; esac
    bk_seen="$bk_seen$bk_path "
    bk_version=$("$bk_path" -S -E -c "$bk_probe" 2>/dev/null) || bk_version=failed
    bk_verdict=unsupported
    case $bk_version in
      cpython-3.*)
        bk_minor=${bk_version#cpython-3.}
        case " @KNOWN@ " in
          *" 3.$bk_minor "*)
            case " @PARTIAL@ " in *" 3.$bk_minor "*) bk_verdict=partial ;; *) bk_verdict=target ;; esac ;;
          *) if [ "$bk_minor" -gt @MAX_MINOR@ ]; then bk_verdict=newer; else bk_verdict=older; fi ;;
        esac ;;
    esac
    bk_tried="$bk_tried$bk_nl$bk_name|$bk_path|$bk_version|$bk_verdict"
    bk_human="$bk_human $bk_path ($bk_version: $bk_verdict)"
    if [ "$bk_verdict" = target ]; then
      bk_pick=$bk_path
      bk_why=target
      break
    fi
    if [ "$bk_verdict" = partial ] && [ -z "$bk_partial" ]; then bk_partial=$bk_path; fi
    if [ "$bk_verdict" = newer ] && [ -z "$bk_newer" ]; then bk_newer=$bk_path; fi
  done
  if [ -z "$bk_pick" ] && [ -n "$bk_partial" ]; then
    bk_pick=$bk_partial
    bk_why=partial
  elif [ -z "$bk_pick" ] && [ -n "$bk_newer" ]; then
    bk_pick=$bk_newer
    bk_why=newer
  fi
fi
if [ -z "$bk_pick" ]; then
  printf 'bookgen-kit: error: no suitable interpreter: this build runs on CPython %s (a newer one with a warning); found:%s; set BOOKGEN_PYTHON to one\n' \
    "@KNOWN@" "${bk_human:- none of python3 @CANDIDATES@ /usr/libexec/platform-python}" >&2
  exit 4
fi
BOOKGEN_KIT_LAUNCH="$$|preamble|$bk_why|$bk_tz|$bk_pick$bk_tried"
export BOOKGEN_KIT_LAUNCH
exec "$bk_pick" -I -S "$0" "$@"
exit 4
