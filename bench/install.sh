#!/usr/bin/env bash
# Installs what the benchmark needs on a fresh Debian 12 machine (run as root).
#
# Takes: $1 = the bench work directory (Exim is unpacked under it).
# Emits: Postfix 3.7 with its tools (smtp-source, smtp-sink, postqueue) from
# Debian's `postfix`, Cyrus SASL's sasldb tools, and Exim 4.96 unpacked with
# `dpkg -x` (exim4-daemon-light conflicts with postfix, so it is never
# installed as a package; it runs from <work>/exim with its own config).
# Nothing is started: policy-rc.d refuses service starts during the install,
# and Postfix is installed with "No configuration" (no /etc/postfix/main.cf
# that would turn this machine into a mail server).
# Fails: on any apt or dpkg error (set -e).
set -euo pipefail
work="${1:?usage: install.sh WORKDIR}"
mkdir -p "$work"
export DEBIAN_FRONTEND=noninteractive

need_apt=0
for bin in /usr/sbin/postfix /usr/sbin/smtp-source /usr/sbin/smtp-sink /usr/sbin/saslpasswd2; do
  [ -x "$bin" ] || need_apt=1
done
for lib in libgnutls-dane.so.0 libidn.so.12 libnsl.so.2; do
  ldconfig -p | grep -q "$lib" || need_apt=1
done
if [ "$need_apt" = 1 ]; then
  apt-get update -qq
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  # Refuse every service start while packages are configured.
  had_policy=0
  [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  if [ "$had_policy" = 0 ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
  fi
  apt-get install -y -qq --no-install-recommends \
    postfix sasl2-bin libsasl2-modules libsasl2-modules-db \
    libgnutls-dane0 libidn12 libnsl2 libpcre2-8-0 libdb5.3 libgnutls30 \
    >"$work/apt-install.log" 2>&1 || { tail -20 "$work/apt-install.log"; exit 1; }
  if [ "$had_policy" = 0 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# Exim: unpack the daemon binary next to the bench, never install it.
exim_dir="$work/exim"
if [ ! -x "$exim_dir/root/usr/sbin/exim4" ]; then
  mkdir -p "$exim_dir/debs" "$exim_dir/root"
  (cd "$exim_dir/debs" && apt-get download exim4-daemon-light >/dev/null 2>&1)
  for deb in "$exim_dir"/debs/*.deb; do dpkg -x "$deb" "$exim_dir/root"; done
fi
# Debian's Exim is built to run as Debian-exim; deliveries never run as root.
getent group Debian-exim >/dev/null || groupadd --system Debian-exim
getent passwd Debian-exim >/dev/null || \
  useradd --system --gid Debian-exim --home-dir /nonexistent --shell /usr/sbin/nologin Debian-exim
# Fail here, not mid-benchmark, if a library the unpacked Exim needs is missing.
if ldd "$exim_dir/root/usr/sbin/exim4" | grep -q "not found"; then
  ldd "$exim_dir/root/usr/sbin/exim4" | grep "not found" >&2
  exit 1
fi
("$exim_dir/root/usr/sbin/exim4" -bV 2>/dev/null || true) | sed -n 1p  # -bV exits 1 without a system config
/usr/sbin/postconf -d -h mail_version | sed "s/^/Postfix /"
