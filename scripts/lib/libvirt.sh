# libvirt for the tests that run balloond beside libvirt-managed VMs
# (docs/libvirt.md): Debian's libvirt daemon and virsh, the user Debian's
# libvirt runs QEMU as, and libvirt's Python binding in the given Python.
# Sourced by scripts/setup.sh (after common.sh). Fast when already done.
# shellcheck shell=bash

# Debian's libvirt-daemon-system (systemd units, polkit, networks, AppArmor
# profiles) is left out on purpose: the tests start their own libvirtd with
# a private configuration (harness/libvirt.py), and no system-wide libvirtd
# should appear on a test machine. The QEMU driver refuses to start unless
# the user it was built to run QEMU as exists, so that user is made here the
# way libvirt-daemon-system's postinst makes it.
LIBVIRT_PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients python3-libvirt)

ensure_libvirt_user() {
    # Debian's fixed ids (64055) when free, as the package does.
    if ! getent group libvirt-qemu >/dev/null; then
        if getent group 64055 >/dev/null; then groupadd --system libvirt-qemu
        else groupadd --system --gid 64055 libvirt-qemu; fi
    fi
    getent group kvm >/dev/null || groupadd --system kvm
    if ! getent passwd libvirt-qemu >/dev/null; then
        log "adding the user libvirt runs QEMU as (libvirt-qemu, group kvm)"
        local uid=()
        getent passwd 64055 >/dev/null || uid=(--uid 64055)
        useradd --system "${uid[@]}" --gid kvm --groups libvirt-qemu --home-dir /var/lib/libvirt \
            --no-create-home --shell /usr/sbin/nologin --comment "Libvirt Qemu" libvirt-qemu 2>/dev/null
    fi
}

# libvirt's binding importable by $1. Debian's python3-libvirt is prebuilt
# for Debian's Python 3.11; a virtualenv of any CPython 3.11 loads the same
# extension, so its files are linked into the environment's site-packages
# (nothing else of Debian's dist-packages becomes visible). Another Python
# version builds libvirt-python from PyPI against Debian's libvirt instead.
ensure_libvirt_binding() {
    local python="$1" site suffix f linked=0
    if "$python" -c 'import libvirt, libvirtaio' 2>/dev/null; then
        return 0
    fi
    site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    if [ -e "/usr/lib/python3/dist-packages/libvirtmod$suffix" ]; then
        log "linking Debian's libvirt binding (python3-libvirt) into $site"
        while read -r f; do
            case "$f" in
                /usr/lib/python3/dist-packages/libvirt*.py|/usr/lib/python3/dist-packages/libvirtmod*"$suffix")
                    ln -sfn "$f" "$site/$(basename "$f")"; linked=1 ;;
            esac
        done < <(dpkg -L python3-libvirt)
        [ "$linked" = 1 ] || die "python3-libvirt lists no module files"
    else
        local version
        apt_install libvirt-dev pkg-config gcc
        version=$(pkg-config --modversion libvirt)
        log "building libvirt-python $version for $("$python" --version) (no Debian build for $suffix)"
        "$python" -m pip install -q "libvirt-python==$version"
    fi
    "$python" -c 'import libvirt, libvirtaio' || die "libvirt's Python binding does not import in $python"
}

ensure_libvirt() {  # $1 = the Python the tests use
    apt_install "${LIBVIRT_PACKAGES[@]}"
    ensure_libvirt_user
    ensure_libvirt_binding "$1"
    log "libvirt $(libvirtd --version | awk '{print $NF}'), binding in $1"
}
