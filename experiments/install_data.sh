#!/bin/sh
# Installs the offline suite's Fashion-MNIST files where the system allows:
# the Debian/Ubuntu package dataset-fashion-mnist (files under
# /usr/share/datasets/fashion-mnist), as root or through passwordless sudo.
# Never fails: without apt or root it says how to provide the files instead
# (MTX_DATA_DIR=DIR or --config.data_dir=DIR), and the suite then runs the
# four digits tasks alone, saying so in its log and results.
#
#   sh experiments/install_data.sh
FILE=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -e "$FILE" ]; then
  echo "install_data: Fashion-MNIST present ($FILE)"
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  SUDO=none
fi
if [ "$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 \
         && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }
fi
if [ -e "$FILE" ]; then
  echo "install_data: installed dataset-fashion-mnist ($FILE)"
else
  echo "install_data: could not install dataset-fashion-mnist (needs apt and" \
    "root); put the four Fashion-MNIST *-idx?-ubyte.gz files in a folder and" \
    "set MTX_DATA_DIR to it, or the suite runs the 4 digits tasks only"
fi
exit 0
