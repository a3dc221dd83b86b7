#!/usr/bin/env bash
# Vendor uPlot (MIT) into server/console/static/vendor/uplot/ from the npm registry.
#   server/console/vendor.sh [VERSION]      (default: the version pinned below)
# Needs `npm` (only to fetch the package tarball; nothing is built). The console serves the
# copied files itself, so a browser never loads anything from another host.
set -euo pipefail
VERSION="${1:-1.6.32}"
HERE="$(cd "$(dirname "$0")" && pwd)"
DEST="$HERE/static/vendor/uplot"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent "uplot@$VERSION" >/dev/null && tar xzf "uplot-$VERSION.tgz")
mkdir -p "$DEST"
rm -f "$DEST"/*
cp "$TMP/package/dist/uPlot.iife.min.js" "$TMP/package/dist/uPlot.min.css" "$TMP/package/LICENSE" "$DEST/"
cat > "$DEST/README.md" <<MD
# uPlot $VERSION (vendored)

Copied unchanged from the npm package \`uplot@$VERSION\` (MIT, see LICENSE) by
\`server/console/vendor.sh $VERSION\`: \`dist/uPlot.iife.min.js\`, \`dist/uPlot.min.css\`, \`LICENSE\`.
sha256:
$(cd "$DEST" && sha256sum uPlot.iife.min.js uPlot.min.css | sed 's/^/    /')
MD
echo "uPlot $VERSION -> $DEST"
