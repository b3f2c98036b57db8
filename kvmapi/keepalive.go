package kvmapi

import "runtime"

func keepAlive(x any) { runtime.KeepAlive(x) }
