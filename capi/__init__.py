"""The C ABI's Python side: `sencache.capi.host` is what libsencache's embedded interpreter drives."""
