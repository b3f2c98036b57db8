// Command mkdirtier writes the tiny dirtier guest (a bzImage) for the demo
// and benchmarks, or reads its pass counter out of snapshot files.
package main

import (
	"encoding/binary"
	"flag"
	"fmt"
	"os"

	"govmm/internal/tinyguest"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

const counterGPA = 0x8000

func main() {
	out := flag.String("out", "", "write the guest bzImage here")
	pages := flag.Uint("pages", 256, "pages the guest dirties per pass")
	snapA := flag.String("counter", "", "print the guest counter in this snapshot")
	snapB := flag.String("counter2", "", "and in this later one")
	flag.Parse()
	if *out != "" {
		code := tinyguest.Dirtier(0x400000, uint32(*pages), counterGPA)
		if err := os.WriteFile(*out, tinyguest.Kernel(code), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	if *snapA != "" {
		a, err := counter(*snapA)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Printf("guest counter before the failover: %d\n", a)
		if *snapB != "" {
			b, err := counter(*snapB)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			fmt.Printf("guest counter on the standby after: %d (went on from the last checkpoint)\n", b)
		}
	}
}

func counter(path string) (uint64, error) {
	st, err := vmm.ReadSnapshotState(path)
	if err != nil {
		return 0, err
	}
	var specs []guestmem.Spec
	for _, r := range vmm.RAMLayout(st.Memory.MemSize) {
		specs = append(specs, guestmem.Spec{GPA: guestmem.GPA(r.GPA), Size: r.Size})
	}
	mem, err := guestmem.New(specs)
	if err != nil {
		return 0, err
	}
	defer mem.Close()
	if _, err := vmm.ReadSnapshot(path, mem); err != nil {
		return 0, err
	}
	b, err := mem.Slice(counterGPA, 8)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b), nil
}
