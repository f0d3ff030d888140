#!/usr/bin/env bash
# Orthanc (Debian's orthanc + orthanc-dicomweb) for the DICOMweb tests and benchmark.
#
#   .ci/orthanc.sh install          apt-get install orthanc orthanc-dicomweb if missing
#   .ci/orthanc.sh start DIR        generated config in DIR, start, wait until it answers;
#                                   prints shell assignments (eval them):
#                                   KMEDTL_ORTHANC_URL, KMEDTL_ORTHANC_DICOMWEB,
#                                   KMEDTL_ORTHANC_USER, KMEDTL_ORTHANC_PASSWORD,
#                                   KMEDTL_ORTHANC_PID
#   .ci/orthanc.sh stop DIR         stop the server started in DIR
#   .ci/orthanc.sh selftest         install, start in a temporary folder, check auth and
#                                   QIDO-RS, stop (what .ci/run calls before the tests)
#
# The config: DICOMweb plugin on, storage inside DIR (temporary), HTTP on a free port,
# RemoteAccessAllowed false (Orthanc 1.10 listens on every interface but serves only
# loopback clients), DICOM server off (no port clash), authentication on with a generated
# user and password (written only to DIR/orthanc.json and DIR/env, mode 600).
# The tests (tests/test_dicomweb.py) start their own servers the same way
# (tests/orthanc_server.py) so they can kill and restart them; they need only `install`.
set -euo pipefail

plugin_path() {
    local p
    for p in /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
             /usr/lib/orthanc/libOrthancDicomWeb.so* \
             /usr/local/share/orthanc/plugins/libOrthancDicomWeb.so; do
        if [[ -e "$p" ]]; then echo "$p"; return 0; fi
    done
    return 1
}

orthanc_bin() {
    command -v Orthanc 2>/dev/null || { [[ -x /usr/sbin/Orthanc ]] && echo /usr/sbin/Orthanc; }
}

install() {
    if [[ -n "$(orthanc_bin || true)" ]] && plugin_path >/dev/null; then
        echo "orthanc.sh: $("$(orthanc_bin)" --version | head -1) with $(plugin_path)" >&2
        return 0
    fi
    local sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "orthanc.sh: need root or sudo for apt-get" >&2; exit 1; }
        sudo="sudo"
    fi
    command -v apt-get >/dev/null || { echo "orthanc.sh: no apt-get: install Orthanc 1.10+ and its DICOMweb plugin" >&2; exit 1; }
    echo "orthanc.sh: installing orthanc orthanc-dicomweb (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    # policy-rc.d may forbid starting the packaged service in containers: that is fine,
    # we never use the system service.
    $sudo apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null
    [[ -n "$(orthanc_bin || true)" ]] && plugin_path >/dev/null || {
        echo "orthanc.sh: apt-get finished but Orthanc or its DICOMweb plugin is missing" >&2; exit 1; }
    echo "orthanc.sh: installed $("$(orthanc_bin)" --version | head -1)" >&2
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir=${1:?usage: orthanc.sh start DIR}
    install
    mkdir -p "$dir/storage"
    dir=$(cd "$dir" && pwd)
    local port user password cfg
    if [[ -f "$dir/env" ]]; then
        # restart with the same port and credentials (the storage survives)
        # shellcheck disable=SC1091
        source "$dir/env"
        port=${KMEDTL_ORTHANC_URL##*:}
        user=$KMEDTL_ORTHANC_USER
        password=$KMEDTL_ORTHANC_PASSWORD
    else
        port=$(free_port)
        user=kmedtl
        password=$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')
    fi
    cfg="$dir/orthanc.json"
    umask 077
    cat > "$cfg" <<EOF
{
  "Name": "kmedtl-ci",
  "StorageDirectory": "$dir/storage",
  "IndexDirectory": "$dir/storage",
  "Plugins": ["$(plugin_path)"],
  "HttpPort": $port,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": true,
  "RegisteredUsers": {"$user": "$password"},
  "DicomServerEnabled": false,
  "DicomPort": $(free_port),
  "HttpThreadsCount": 16,
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": false,
               "Host": "127.0.0.1", "Ssl": false}
}
EOF
    "$(orthanc_bin)" "$cfg" > "$dir/orthanc.log" 2>&1 &
    local pid=$!
    local url="http://127.0.0.1:$port"
    for _ in $(seq 1 150); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "orthanc.sh: Orthanc exited; log:" >&2; tail -20 "$dir/orthanc.log" >&2; exit 1
        fi
        if python3 - "$url" "$user" "$password" <<'PY' 2>/dev/null; then break; fi
import base64, sys, urllib.request
url, user, password = sys.argv[1:4]
req = urllib.request.Request(url + "/system", headers={
    "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
urllib.request.urlopen(req, timeout=1).read()
PY
        sleep 0.2
    done
    cat > "$dir/env" <<EOF
KMEDTL_ORTHANC_URL=$url
KMEDTL_ORTHANC_DICOMWEB=$url/dicom-web
KMEDTL_ORTHANC_USER=$user
KMEDTL_ORTHANC_PASSWORD=$password
KMEDTL_ORTHANC_PID=$pid
EOF
    echo "$pid" > "$dir/orthanc.pid"
    cat "$dir/env"
}

stop() {
    local dir=${1:?usage: orthanc.sh stop DIR}
    [[ -f "$dir/orthanc.pid" ]] || return 0
    local pid
    pid=$(cat "$dir/orthanc.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/orthanc.pid"
}

selftest() (  # a subshell: its EXIT trap stops the server whatever happens
    dir=$(mktemp -d)
    trap 'stop "$dir"; rm -rf "$dir"' EXIT
    eval "$(start "$dir")"
    python3 - "$KMEDTL_ORTHANC_DICOMWEB" "$KMEDTL_ORTHANC_USER" "$KMEDTL_ORTHANC_PASSWORD" <<'PY'
import base64, json, sys, urllib.error, urllib.request
url, user, password = sys.argv[1:4]
try:  # authentication is on: no credentials, no answer
    urllib.request.urlopen(url + "/studies", timeout=5)
    sys.exit("orthanc.sh: Orthanc answered without credentials (authentication is off?)")
except urllib.error.HTTPError as exc:
    assert exc.code == 401, exc.code
auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
req = urllib.request.Request(url + "/studies", headers={"Authorization": auth,
                                                       "Accept": "application/dicom+json"})
body = urllib.request.urlopen(req, timeout=5).read()
assert json.loads(body or b"[]") == [], body[:200]
print("orthanc.sh: selftest passed (auth on, QIDO-RS answers)", file=sys.stderr)
PY
)

cmd=${1:-}
shift || true
case "$cmd" in
    install) install ;;
    start) start "$@" ;;
    stop) stop "$@" ;;
    selftest) install; selftest ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
