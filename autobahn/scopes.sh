# The case lists of autobahn/run.sh and autobahn/run-adapter.sh (sourced by both).
#
# full:   every case (517), sections 12-13 (permessage-deflate) included.
# core:   sections 1-10 (301 cases), the framing, UTF-8 and closing cases.
# sample: core plus 86 of the 216 permessage-deflate cases (387 in all), for .ci/run. Each
#         of the 12 deflate groups (12.1-12.5: the default offer; 13.1-13.7: offers of
#         window bits and context takeover in every combination) runs its
#         cases 1-6 (1000 messages of 16 B to 8 KiB) and 11 (8 KiB, fragmented every
#         256 B); 12.1.10 and 13.7.18 add 128 KiB messages, whole and in 32 KiB frames.
#         The cases left out repeat these with larger messages, which costs wstest (a
#         single-threaded Python compressor) most of the full suite's 8-15 minutes on a
#         2-core VM.
# scope_cases NAME sets `cases` (empty: all) and `expect` (the case count) for a scope.
scope_cases() {
  local core="1.*,2.*,3.*,4.*,5.*,6.*,7.*,8.*,9.*,10.*"
  case "$1" in
    full) cases=""; expect=517 ;;
    core) cases=$core; expect=301 ;;
    sample)
      cases=$core
      # Case ids, not patterns: wstest matches a pattern as a prefix (12.*.1 takes 12.1.1x).
      local group n
      for group in 12.1 12.2 12.3 12.4 12.5 13.1 13.2 13.3 13.4 13.5 13.6 13.7; do
        for n in 1 2 3 4 5 6 11; do cases+=",$group.$n"; done
      done
      cases+=",12.1.10,13.7.18"
      expect=387 ;;
    *) return 1 ;;
  esac
  scope=$1
}
