package main

import (
	"context"
	"fmt"

	"govmm/ctlapi"
	"govmm/vmm"
)

// migrate is wired to the replication package once it lands.
func migrate(ctx context.Context, m *vmm.Machine, to string, progress func(ctlapi.Progress)) (ctlapi.MigrateResult, error) {
	return ctlapi.MigrateResult{}, fmt.Errorf("migrate: %w", ctlapi.ErrNotSupported)
}
