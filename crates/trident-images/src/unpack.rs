//! Unpacking one layer (a tar stream, possibly gzip or zstd compressed) into its own
//! directory, confined to it, with OCI whiteouts turned into overlayfs ones.
