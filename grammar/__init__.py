"""The .mem grammar (memdsl.lark), loaded by memdsl.parse."""
