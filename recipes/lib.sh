# shellcheck shell=bash
# Shared by the recipes (sourced, not run): the --dry-run flag and how a command is shown.
#
#   HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
#   # shellcheck source=lib.sh
#   source "$HERE/lib.sh"
#   parse_recipe_args "$@"      # DRY_RUN=1 when --dry-run was given; EXTRA=(every other argument)
#   show_command "${CMD[@]}"    # one line, quoted as the shell would need it

# parse_recipe_args ARG...: sets DRY_RUN (0 or 1) and EXTRA (the other arguments in order: further
# OpenRLHF or --safesteer.* flags, which the recipe passes through unchanged).
# shellcheck disable=SC2034  # DRY_RUN and EXTRA are the sourcing recipe's variables
parse_recipe_args() {
  DRY_RUN=0
  EXTRA=()
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      *) EXTRA+=("$arg") ;;
    esac
  done
}

# show_command WORD...: print the command on one line, each word shell-quoted (what --dry-run prints).
show_command() {
  printf ' %q' "$@"
  echo
}

# absolute_model: a local model folder becomes an absolute path, read the same way on every node and by
# `ray job submit`'s entrypoint, which runs in the job supervisor's directory; a hub id is left as it is.
absolute_model() {
  if [[ -d "$1" ]]; then realpath "$1"; else printf '%s\n' "$1"; fi
}
